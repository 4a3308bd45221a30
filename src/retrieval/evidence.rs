//! Evidence units: the approved articles split into sentences, list items and table rows, in
//! reading order and with their section, each with its sentence embedding.
//!
//! Answers state facts only by quoting these units verbatim, so the split decides what a quote is:
//! a sentence never runs across a list, a list item is one unit (with its marker), and a table row
//! is its cells labelled by the header row. Units are derived from the chunks at index time; their
//! vectors are stored beside the tantivy index in one file per index version
//! (`evidence-<version>-<model>.bin`), written before the tantivy commit that makes the version
//! visible, so a reader always finds the evidence of the commit it searches.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::RetrievalError;

/// What kind of text a unit is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnitKind {
    /// A sentence of a paragraph.
    Sentence,
    /// A list item; `marker` is `-` or the item's number (`1.`).
    Item { marker: String },
    /// A table row, its cells labelled with the header row's.
    Row,
}

/// One quotable piece of an approved article.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    /// The article's product area (lower case) and locale, for retrieval filters.
    pub product_area: String,
    pub locale: String,
    /// Heading path (as the chunk's, refined by headings inside the chunk).
    pub section: String,
    /// Reading order within the document, from 0.
    pub position: u32,
    /// Units of one paragraph, list or table share a block number (per document).
    pub block: u32,
    #[serde(flatten)]
    pub kind: UnitKind,
    /// The text, verbatim (markup already dropped at parse time; list markers removed).
    pub text: String,
}

impl Unit {
    pub fn is_item(&self) -> bool {
        matches!(self.kind, UnitKind::Item { .. })
    }

    /// The unit as an answer shows it: list items with their marker.
    pub fn display(&self) -> String {
        match &self.kind {
            UnitKind::Item { marker } => format!("{marker} {}", self.text),
            _ => self.text.clone(),
        }
    }

    /// What the embedding model reads for this unit: the article title and section give a short
    /// sentence ("At least 12 characters.") its topic.
    pub fn embedded_text(&self) -> String {
        if self.section.is_empty() {
            format!("{}: {}", self.title, self.text)
        } else {
            format!("{} - {}: {}", self.title, self.section, self.text)
        }
    }

    /// Words in the text.
    pub fn words(&self) -> usize {
        self.text.split_whitespace().count()
    }
}

/// A unit before it is placed in a document (see [`split_chunk`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub section: String,
    /// Block number within the chunk.
    pub block: u32,
    pub kind: UnitKind,
    pub text: String,
}

/// Words that end with a period without ending a sentence.
const ABBREVIATIONS: &[&str] = &["e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "st", "no", "approx", "incl", "inc", "ltd", "co", "jr", "sr", "fig", "min", "max"];

/// Splits a paragraph into sentences: a sentence ends at `.`, `!` or `?` (with any closing quotes or
/// brackets) followed by whitespace and a capital letter, a digit or an opening quote, unless the
/// word before is a known abbreviation or a single letter.
pub fn sentences(paragraph: &str) -> Vec<String> {
    let text: String = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let (_, c) = chars[i];
        if matches!(c, '.' | '!' | '?') {
            let mut j = i + 1;
            while j < chars.len() && matches!(chars[j].1, '"' | '\'' | ')' | ']' | '”' | '’') {
                j += 1;
            }
            let at_space = j < chars.len() && chars[j].1 == ' ';
            let next = chars.get(j + 1).map(|(_, c)| *c);
            let opens = next.is_some_and(|n| n.is_uppercase() || n.is_ascii_digit() || matches!(n, '"' | '“' | '\'' | '(' | '‘'));
            if at_space && opens && !(c == '.' && ends_with_abbreviation(&text[start..chars[i].0])) {
                let end = chars.get(j).map(|(b, _)| *b).unwrap_or(text.len());
                out.push(text[start..end].trim().to_string());
                start = end;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

fn ends_with_abbreviation(before: &str) -> bool {
    let word = before.rsplit(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("");
    let lower = word.to_lowercase();
    (word.chars().count() == 1 && word.chars().all(char::is_alphabetic)) || ABBREVIATIONS.contains(&lower.as_str())
}

/// `1. text` / `12) text` -> ("1.", "text").
fn ordered_marker(line: &str) -> Option<(&str, &str)> {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = &line[digits..];
    let punct = rest.chars().next().filter(|c| matches!(c, '.' | ')'))?;
    let after = &rest[punct.len_utf8()..];
    after.starts_with(' ').then(|| (&line[..digits + 1], after.trim_start()))
}

fn table_cells(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    if !(t.starts_with('|') && t.ends_with('|') && t.len() >= 2) {
        return None;
    }
    Some(t[1..t.len() - 1].split('|').map(|c| c.trim().to_string()).collect())
}

fn is_separator_row(cells: &[String]) -> bool {
    cells.iter().all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
}

/// Splits one chunk's text into units. `section` is the chunk's section; `headings` are the
/// article's heading texts with the section path each one opens (a merged chunk keeps a smaller
/// part's heading as a line of text, which moves the units after it into that section).
pub fn split_chunk(text: &str, section: &str, headings: &[(String, String)]) -> Vec<Draft> {
    let mut out = Vec::new();
    let mut section = section.to_string();
    let mut block = 0u32;
    for paragraph in text.split("\n\n") {
        let paragraph = paragraph.trim();
        if paragraph.is_empty() {
            continue;
        }
        if let Some((_, path)) = headings.iter().find(|(h, _)| h == paragraph) {
            section = path.clone();
            continue;
        }
        let mut prose: Vec<&str> = Vec::new();
        let mut header: Option<Vec<String>> = None;
        let mut kind_of_block: Option<&'static str> = None;
        let flush_prose = |prose: &mut Vec<&str>, out: &mut Vec<Draft>, block: &mut u32, section: &str| {
            if prose.is_empty() {
                return;
            }
            for s in sentences(&prose.join(" ")) {
                out.push(Draft { section: section.to_string(), block: *block, kind: UnitKind::Sentence, text: s });
            }
            prose.clear();
            *block += 1;
        };
        for line in paragraph.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let item = if let Some(rest) = line.strip_prefix("- ") {
                Some(("-".to_string(), rest.trim()))
            } else {
                ordered_marker(line).map(|(m, rest)| (m.to_string(), rest))
            };
            if let Some((marker, rest)) = item {
                flush_prose(&mut prose, &mut out, &mut block, &section);
                if kind_of_block != Some("list") {
                    if kind_of_block.is_some() {
                        block += 1;
                    }
                    kind_of_block = Some("list");
                }
                if !rest.is_empty() {
                    out.push(Draft { section: section.clone(), block, kind: UnitKind::Item { marker }, text: rest.to_string() });
                }
                continue;
            }
            if let Some(cells) = table_cells(line) {
                flush_prose(&mut prose, &mut out, &mut block, &section);
                if kind_of_block != Some("table") {
                    if kind_of_block.is_some() {
                        block += 1;
                    }
                    kind_of_block = Some("table");
                    header = None;
                }
                if is_separator_row(&cells) {
                    continue;
                }
                match &header {
                    None => header = Some(cells),
                    Some(h) => {
                        let row: Vec<String> = cells
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| !c.is_empty())
                            .map(|(i, c)| match h.get(i).filter(|x| !x.is_empty()) {
                                Some(label) => format!("{label}: {c}"),
                                None => c.clone(),
                            })
                            .collect();
                        if !row.is_empty() {
                            out.push(Draft { section: section.clone(), block, kind: UnitKind::Row, text: row.join("; ") });
                        }
                    }
                }
                continue;
            }
            if kind_of_block.is_some() {
                block += 1;
                kind_of_block = None;
            }
            prose.push(line);
        }
        flush_prose(&mut prose, &mut out, &mut block, &section);
        if kind_of_block.is_some() {
            block += 1;
        }
    }
    out
}

/// The evidence of one index version: every unit with its vector, and lookups.
#[derive(Debug, Default)]
pub struct EvidenceTable {
    pub units: Vec<Unit>,
    /// `units.len() * dim` floats, unit vectors in unit order: each unit read with its article
    /// title and section (retrieval), then each unit's text alone (telling a unit from its
    /// neighbours within one article).
    vectors: Vec<f32>,
    plain: Vec<f32>,
    pub dim: usize,
    /// sha256 of the embedding model that made the vectors.
    pub model: String,
    by_chunk: HashMap<String, Range<usize>>,
    by_doc: HashMap<String, Range<usize>>,
    /// Normalized texts of every unit, for "is this sentence a verbatim quote?".
    verbatim: HashSet<String>,
}

/// Text as the verbatim check compares it: lower case, curly quotes straightened, whitespace runs
/// as one space, without a trailing citation marker or final punctuation.
pub fn normalize_quote(text: &str) -> String {
    let mut t: String = text
        .chars()
        .map(|c| match c {
            '’' | '‘' => '\'',
            '“' | '”' => '"',
            c => c,
        })
        .collect::<String>()
        .to_lowercase();
    loop {
        let trimmed = t.trim_end();
        // A trailing marker such as ` [2]` or ` [1, 3]`.
        if trimmed.ends_with(']') {
            if let Some(open) = trimmed.rfind('[') {
                let inner = &trimmed[open + 1..trimmed.len() - 1];
                if !inner.is_empty() && inner.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') {
                    t = trimmed[..open].to_string();
                    continue;
                }
            }
        }
        let cut = trimmed.trim_end_matches(['.', '!', '?', ';', ':', ',']);
        if cut.len() != t.len() {
            t = cut.to_string();
            continue;
        }
        break;
    }
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl EvidenceTable {
    pub fn new(units: Vec<Unit>, vectors: Vec<f32>, plain: Vec<f32>, dim: usize, model: String) -> EvidenceTable {
        let mut by_chunk: HashMap<String, Range<usize>> = HashMap::new();
        let mut by_doc: HashMap<String, Range<usize>> = HashMap::new();
        for (i, u) in units.iter().enumerate() {
            by_chunk.entry(u.chunk_id.clone()).and_modify(|r| r.end = i + 1).or_insert(i..i + 1);
            by_doc.entry(u.doc_id.clone()).and_modify(|r| r.end = i + 1).or_insert(i..i + 1);
        }
        let verbatim = units.iter().map(|u| normalize_quote(&u.text)).collect();
        EvidenceTable { units, vectors, plain, dim, model, by_chunk, by_doc, verbatim }
    }

    pub fn len(&self) -> usize {
        self.units.len()
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Unit indexes of one chunk, in reading order.
    pub fn of_chunk(&self, chunk_id: &str) -> Range<usize> {
        self.by_chunk.get(chunk_id).cloned().unwrap_or(0..0)
    }

    /// Unit indexes of one document, in reading order.
    pub fn of_doc(&self, doc_id: &str) -> Range<usize> {
        self.by_doc.get(doc_id).cloned().unwrap_or(0..0)
    }

    /// Whether `sentence` is, once normalized, the text of some approved unit (or a run of
    /// consecutive sentences of one paragraph).
    pub fn is_verbatim(&self, sentence: &str) -> bool {
        let n = normalize_quote(sentence);
        !n.is_empty() && self.verbatim.contains(&n)
    }

    /// Cosine similarity of `query` (a unit vector) with every unit read in context, in unit order.
    pub fn similarities(&self, query: &[f32]) -> Vec<f32> {
        Self::dots(&self.vectors, self.dim, self.units.len(), query)
    }

    /// Cosine similarity of `query` with unit `i`'s text alone.
    pub fn plain_similarity(&self, i: usize, query: &[f32]) -> f32 {
        if query.len() != self.dim || self.plain.len() < (i + 1) * self.dim {
            return 0.0;
        }
        crate::embed::dot(&self.plain[i * self.dim..(i + 1) * self.dim], query)
    }

    fn dots(vectors: &[f32], dim: usize, n: usize, query: &[f32]) -> Vec<f32> {
        if query.len() != dim || dim == 0 || vectors.len() != n * dim {
            return vec![0.0; n];
        }
        vectors.chunks_exact(dim).map(|v| crate::embed::dot(v, query)).collect()
    }

    /// Vectors keyed by the sha256 of the text they embed, for reuse by the next build.
    pub fn vectors_by_text(&self) -> HashMap<[u8; 32], &[f32]> {
        let mut out: HashMap<[u8; 32], &[f32]> = HashMap::new();
        for (i, u) in self.units.iter().enumerate() {
            out.insert(text_key(&u.embedded_text()), self.vector(i));
            if self.plain.len() == self.vectors.len() {
                out.insert(text_key(&u.text), &self.plain[i * self.dim..(i + 1) * self.dim]);
            }
        }
        out
    }

    /// Writes the table to `path` atomically (temporary file, fsync, rename, directory fsync).
    pub fn write(&self, path: &Path) -> Result<(), RetrievalError> {
        let header = Header { format: FORMAT.into(), dim: self.dim, model: self.model.clone(), units: self.units.clone() };
        let json = serde_json::to_vec(&header).map_err(|e| RetrievalError::Evidence(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(MAGIC)?;
            f.write_all(&(json.len() as u64).to_le_bytes())?;
            f.write_all(&json)?;
            for x in self.vectors.iter().chain(&self.plain) {
                f.write_all(&x.to_le_bytes())?;
            }
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Reads a table written by [`write`](Self::write); any damage is an error naming the file.
    pub fn read(path: &Path) -> Result<EvidenceTable, RetrievalError> {
        let bad = |why: String| RetrievalError::Evidence(format!("{} {why}; rebuild the index with `helpline index`", path.display()));
        let mut f = std::fs::File::open(path).map_err(|e| bad(format!("cannot be read ({e})")))?;
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic).map_err(|_| bad("is truncated".into()))?;
        if &magic != MAGIC {
            return Err(bad("is not an evidence file".into()));
        }
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|_| bad("is truncated".into()))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 32 {
            return Err(bad("has an implausible header".into()));
        }
        let mut json = vec![0u8; len as usize];
        f.read_exact(&mut json).map_err(|_| bad("is truncated".into()))?;
        let header: Header = serde_json::from_slice(&json).map_err(|e| bad(format!("has a bad header ({e})")))?;
        if header.format != FORMAT {
            return Err(bad(format!("has format {:?}, this build reads {FORMAT:?}", header.format)));
        }
        let mut raw = Vec::new();
        f.read_to_end(&mut raw).map_err(|e| bad(format!("cannot be read ({e})")))?;
        let each = header.units.len() * header.dim;
        if raw.len() != 2 * each * 4 {
            return Err(bad(format!("holds {} bytes of vectors, expected {}", raw.len(), 2 * each * 4)));
        }
        let mut all: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let plain = all.split_off(each);
        Ok(EvidenceTable::new(header.units, all, plain, header.dim, header.model))
    }
}

const MAGIC: &[u8; 8] = b"HLEVID1\n";
const FORMAT: &str = "helpline-evidence-2";

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    dim: usize,
    model: String,
    units: Vec<Unit>,
}

pub fn text_key(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Where the evidence of index `version`, embedded by model `model` (its sha256), is kept.
pub fn file_for(index_dir: &Path, version: &str, model: &str) -> PathBuf {
    index_dir.join(format!("evidence-{version}-{}.bin", &model[..model.len().min(12)]))
}

/// Removes evidence files other than `keep` (older versions, other models).
pub fn remove_others(index_dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(index_dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("evidence-") && (name.ends_with(".bin") || name.ends_with(".tmp")) && p != keep {
            let _ = std::fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_ends_but_not_abbreviations_or_numbers() {
        let s = sentences("Go to Settings, e.g. Billing. Pay $1,200.50 now! Then wait 5 min. for it. Done? Yes.");
        assert_eq!(s, ["Go to Settings, e.g. Billing.", "Pay $1,200.50 now!", "Then wait 5 min. for it.", "Done?", "Yes."]);
        assert_eq!(sentences("Version 1.5 is out. it continues"), ["Version 1.5 is out. it continues"]);
        assert_eq!(sentences("He said \"stop.\" Then left."), ["He said \"stop.\"", "Then left."]);
    }

    #[test]
    fn chunks_split_into_sentences_items_and_rows() {
        let headings = vec![("Who approves".to_string(), "Exceptions > Who approves".to_string())];
        let text = "Intro one. Intro two.\n\n1. First step.\n2. Second step. More.\n\n- a\n- b\n\n| Plan | Price |\n|---|---|\n| Free | $0 |\n\nWho approves\n\nA manager.";
        let u = split_chunk(text, "Exceptions", &headings);
        let kinds: Vec<String> = u.iter().map(|d| format!("{}:{}", d.block, d.text)).collect();
        assert_eq!(kinds, ["0:Intro one.", "0:Intro two.", "1:First step.", "1:Second step. More.", "2:a", "2:b", "3:Plan: Free; Price: $0", "4:A manager."]);
        assert_eq!(u[2].kind, UnitKind::Item { marker: "1.".into() });
        assert_eq!(u[7].section, "Exceptions > Who approves");
        assert_eq!(u[0].section, "Exceptions");
    }

    #[test]
    fn quotes_normalize_markers_and_punctuation() {
        assert_eq!(normalize_quote("The link is valid for 60 minutes. [1]"), "the link is valid for 60 minutes");
        assert_eq!(normalize_quote("It’s  fine!"), "it's fine");
    }
}
