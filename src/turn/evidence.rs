//! Selecting the evidence that answers a question: the sentences, list items and table rows of the
//! retrieved passages, scored by their sentence-embedding similarity to the question and by how much
//! of the question's (idf-weighted) vocabulary they hold, then grown into readable blocks: a list
//! whole and in order (with its introducing sentence), a sentence with the one it refers back to.

use std::collections::{HashMap, HashSet};

use crate::retrieval::evidence::{EvidenceTable, Unit, UnitKind};
use crate::retrieval::{KnowledgeBase, Passage, Retrieval, RetrievalError};

/// Passages retrieved to find candidate documents.
pub const RETRIEVE_K: usize = 5;
/// Documents (in the order retrieval ranks their best passage) whose units are candidates.
pub const CANDIDATE_DOCS: usize = 3;
/// Weight of lexical coverage (of the unit with its section heading) next to the cosine similarity.
pub const LEXICAL_WEIGHT: f32 = 0.6;
/// Weight of lexical coverage of the unit's own text.
pub const TEXT_LEXICAL_WEIGHT: f32 = 0.4;
/// Weight of the article title's coverage of the question (what the whole article is about).
pub const TITLE_WEIGHT: f32 = 0.2;
/// Bonus of a unit from the best-ranked document (decaying with rank).
pub const RANK_WEIGHT: f32 = 0.1;
/// A further block joins the answer when its unit scores within this margin of the best one.
pub const BLOCK_MARGIN: f32 = 0.25;
/// Most blocks in one answer.
pub const MAX_BLOCKS: usize = 3;
/// Most words of prose (sentences) in one answer; lists and tables count their items instead.
pub const MAX_PROSE_WORDS: usize = 110;
/// Lists longer than this are quoted in part: the items that answer, in order, and a line saying how
/// many the article lists (never cut silently).
pub const MAX_LIST_ITEMS: usize = 12;
/// A paragraph of at most this many sentences and words is quoted whole.
pub const PARAGRAPH_SENTENCES: usize = 4;
pub const PARAGRAPH_WORDS: usize = 75;
/// Most sentences one prose block grows to.
pub const MAX_BLOCK_SENTENCES: usize = 3;

/// Opening words of a sentence that leans on the one before it.
const ANAPHORA: &[&str] = &[
    "this", "that", "these", "those", "it", "its", "they", "them", "their", "each", "such", "both", "otherwise", "however", "instead",
    "then", "also", "there", "here", "if so", "in that case", "after that", "once",
];

/// One quoted block of an answer: units of one document, in reading order.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Indexes into the evidence table, in reading order.
    pub units: Vec<usize>,
    /// The block's best unit score.
    pub score: f32,
    /// A long list quoted in part: how many items the article's list has in all (0: quoted whole).
    pub list_total: usize,
}

/// The evidence chosen for one answer.
#[derive(Debug, Clone)]
pub struct Selection {
    /// In answer order (best first).
    pub blocks: Vec<Block>,
    /// The passages the blocks come from, numbered `[1]`, `[2]`, ... in order of first use.
    pub passages: Vec<Passage>,
    /// For each block, the (1-based) passage numbers it cites.
    pub cites: Vec<Vec<usize>>,
    /// Gate features of the best block: idf-weighted share of the question's terms its units (with
    /// their title and section) hold, and its best unit's similarity to the question.
    pub coverage: f32,
    pub similarity: f32,
    /// Over every block: the share of the question's terms held, weighting rare terms more
    /// (idf squared), and the best similarity of a unit's own text to the question.
    pub focus: f32,
    pub plain_similarity: f32,
    /// The best coverage of the question's terms by a whole article quoted (is the article about
    /// what the question is about?).
    pub doc_coverage: f32,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Every unit quoted, in answer order.
    pub fn unit_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().flat_map(|b| b.units.iter().copied())
    }
}

/// Scores units of the candidate passages against the question.
pub struct Scorer<'a> {
    kb: &'a KnowledgeBase,
    retrieval: &'a Retrieval,
    /// (term, weight * idf) of the question.
    terms: Vec<(String, f32)>,
    total: f32,
}

impl<'a> Scorer<'a> {
    pub fn new(kb: &'a KnowledgeBase, retrieval: &'a Retrieval) -> Result<Scorer<'a>, RetrievalError> {
        let words: Vec<String> = retrieval.terms.iter().map(|(t, _)| t.clone()).collect();
        let idf = kb.term_idf(&words)?;
        let terms: Vec<(String, f32)> = retrieval.terms.iter().zip(idf).map(|((t, w), i)| (t.clone(), w * i)).collect();
        let total = terms.iter().map(|(_, w)| w).sum();
        Ok(Scorer { kb, retrieval, terms, total })
    }

    /// Share of the question's terms found in `text`, each weighted by its idf squared (so that
    /// the rare, specific words of a question count most).
    pub fn focus(&self, text: &str) -> f32 {
        let total: f32 = self.terms.iter().map(|(_, w)| w * w).sum();
        if total <= 0.0 {
            return 0.0;
        }
        let words: HashSet<String> = self.kb.analyze(text).into_iter().collect();
        self.terms.iter().filter(|(t, _)| words.contains(t)).map(|(_, w)| w * w).sum::<f32>() / total
    }

    /// Share of the question's weighted terms found in `text`.
    pub fn coverage(&self, text: &str) -> f32 {
        if self.total <= 0.0 {
            return 0.0;
        }
        let words: HashSet<String> = self.kb.analyze(text).into_iter().collect();
        self.terms.iter().filter(|(t, _)| words.contains(t)).map(|(_, w)| w).sum::<f32>() / self.total
    }

    fn unit_score(&self, i: usize, u: &Unit, rank: usize) -> f32 {
        let sim = self.retrieval.similarities.get(i).copied().unwrap_or(0.0);
        let lex = self.coverage(&format!("{}\n{}", u.section, u.text));
        let lex_text = self.coverage(&u.text);
        let title = self.coverage(&u.title);
        sim + LEXICAL_WEIGHT * lex + TEXT_LEXICAL_WEIGHT * lex_text + TITLE_WEIGHT * title + RANK_WEIGHT / (1.0 + rank as f32)
    }
}

/// Picks the evidence for the question from the retrieved passages (`restrict`: only from this
/// document, for decisions that quote one rule).
pub fn select(kb: &KnowledgeBase, retrieval: &Retrieval, question: &str, restrict: Option<&str>) -> Result<Selection, RetrievalError> {
    let table = &retrieval.evidence;
    let (block_margin, max_blocks, candidates_n, max_words) = (BLOCK_MARGIN, MAX_BLOCKS, CANDIDATE_DOCS, MAX_PROSE_WORDS);
    let scorer = Scorer::new(kb, retrieval)?;
    let _ = question;
    // Candidate units: those of the best passages (or of the restricting document, whole).
    let mut candidates: Vec<(usize, f32)> = Vec::new();
    match restrict {
        Some(doc) => {
            for i in table.of_doc(doc) {
                candidates.push((i, scorer.unit_score(i, &table.units[i], 0)));
            }
        }
        None => {
            // Every unit of the best documents: the answer is often in another chunk of the
            // article retrieval found.
            let mut docs: Vec<&str> = Vec::new();
            for p in &retrieval.passages {
                if !docs.contains(&p.doc_id.as_str()) {
                    docs.push(&p.doc_id);
                }
            }
            for (rank, doc) in docs.iter().take(candidates_n).enumerate() {
                for i in table.of_doc(doc) {
                    candidates.push((i, scorer.unit_score(i, &table.units[i], rank)));
                }
            }
        }
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let Some(&(_, best)) = candidates.first() else {
        return Ok(Selection { blocks: Vec::new(), passages: Vec::new(), cites: Vec::new(), coverage: 0.0, similarity: 0.0, focus: 0.0, plain_similarity: 0.0, doc_coverage: 0.0 });
    };

    let mut blocks: Vec<Block> = Vec::new();
    let mut used: HashSet<usize> = HashSet::new();
    let mut seen_text: HashSet<String> = HashSet::new();
    let mut prose_words = 0usize;
    let scores: HashMap<usize, f32> = candidates.iter().copied().collect();
    for &(i, score) in &candidates {
        if blocks.len() >= max_blocks || (score < best - block_margin && !blocks.is_empty()) {
            break;
        }
        if used.contains(&i) {
            continue;
        }
        let u = &table.units[i];
        // A sentence next to a prose block already chosen joins that block.
        if matches!(u.kind, UnitKind::Sentence) {
            if let Some(b) = blocks.iter_mut().find(|b| {
                let first = &table.units[b.units[0]];
                first.doc_id == u.doc_id && first.block == u.block && matches!(first.kind, UnitKind::Sentence) && b.units.len() < MAX_BLOCK_SENTENCES
            }) {
                if prose_words + u.words() > max_words || !seen_text.insert(crate::retrieval::evidence::normalize_quote(&u.text)) {
                    continue;
                }
                prose_words += u.words();
                b.units.push(i);
                b.units.sort_by_key(|&j| table.units[j].position);
                used.insert(i);
                continue;
            }
        }
        let mut block = grow(table, i, score, &scores);
        block.units.retain(|j| !used.contains(j));
        // No sentence is ever repeated, even when two articles say the same thing.
        block.units.retain(|&j| seen_text.insert(crate::retrieval::evidence::normalize_quote(&table.units[j].text)));
        if block.units.is_empty() {
            continue;
        }
        let words: usize = block.units.iter().filter(|&&j| matches!(table.units[j].kind, UnitKind::Sentence)).map(|&j| table.units[j].words()).sum();
        if !blocks.is_empty() && prose_words + words > max_words {
            continue;
        }
        prose_words += words;
        used.extend(block.units.iter().copied());
        blocks.push(block);
    }

    // Reading order: the article of the best block first, each article's blocks as the article has
    // them.
    let mut doc_order: Vec<String> = Vec::new();
    for b in &blocks {
        let d = &table.units[b.units[0]].doc_id;
        if !doc_order.contains(d) {
            doc_order.push(d.clone());
        }
    }
    blocks.sort_by_key(|b| {
        let u = &table.units[b.units[0]];
        (doc_order.iter().position(|d| d == &u.doc_id).unwrap_or(usize::MAX), u.position)
    });

    // Passages cited, numbered in order of first use.
    let mut passages: Vec<Passage> = Vec::new();
    let mut cites: Vec<Vec<usize>> = Vec::new();
    for b in &blocks {
        let mut mine = Vec::new();
        for &j in &b.units {
            let chunk = &table.units[j].chunk_id;
            let n = match passages.iter().position(|p| &p.chunk_id == chunk) {
                Some(n) => n + 1,
                None => {
                    let p = match retrieval.passages.iter().find(|p| &p.chunk_id == chunk) {
                        Some(p) => p.clone(),
                        None => match kb.passage(chunk)? {
                            Some(p) => p,
                            None => continue,
                        },
                    };
                    passages.push(p);
                    passages.len()
                }
            };
            if !mine.contains(&n) {
                mine.push(n);
            }
        }
        cites.push(mine);
    }
    let (coverage, similarity) = match blocks.first() {
        Some(b) => {
            let u0 = &table.units[b.units[0]];
            let text: String = b.units.iter().map(|&j| table.units[j].text.as_str()).collect::<Vec<_>>().join(" ");
            let cov = scorer.coverage(&format!("{}\n{}\n{}", u0.title, u0.section, text));
            let sim = b.units.iter().map(|&j| retrieval.similarities.get(j).copied().unwrap_or(0.0)).fold(f32::MIN, f32::max);
            (cov, sim)
        }
        None => (0.0, 0.0),
    };
    let all: String = blocks
        .iter()
        .flat_map(|b| b.units.iter())
        .map(|&j| {
            let u = &table.units[j];
            format!("{}\n{}\n{}", u.title, u.section, u.text)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let focus = scorer.focus(&all);
    let plain_similarity =
        blocks.iter().flat_map(|b| b.units.iter()).map(|&j| retrieval.plain_similarity(j)).fold(0.0f32, f32::max);
    let mut docs_used: Vec<&str> = Vec::new();
    for b in &blocks {
        let d = table.units[b.units[0]].doc_id.as_str();
        if !docs_used.contains(&d) {
            docs_used.push(d);
        }
    }
    let doc_coverage = docs_used
        .iter()
        .map(|d| {
            let r = table.of_doc(d);
            let text: String = table.units[r.clone()].iter().map(|u| format!("{}\n{}", u.section, u.text)).collect::<Vec<_>>().join("\n");
            let title = table.units.get(r.start).map(|u| u.title.as_str()).unwrap_or("");
            scorer.coverage(&format!("{title}\n{text}"))
        })
        .fold(0.0f32, f32::max);
    Ok(Selection { blocks, passages, cites, coverage, similarity, focus, plain_similarity, doc_coverage })
}

/// The block around unit `i`: a list or table whole (long lists in part), with the sentence that
/// introduces it; a sentence with the one before it when it refers back to it.
fn grow(table: &EvidenceTable, i: usize, score: f32, scores: &HashMap<usize, f32>) -> Block {
    let u = &table.units[i];
    let doc = table.of_doc(&u.doc_id);
    let same_block: Vec<usize> = doc.clone().filter(|&j| table.units[j].block == u.block).collect();
    match u.kind {
        UnitKind::Item { .. } | UnitKind::Row => {
            let mut units = same_block.clone();
            let mut list_total = 0;
            if units.len() > MAX_LIST_ITEMS {
                // The items that answer best, kept in the list's order.
                list_total = units.len();
                let mut ranked = units.clone();
                ranked.sort_by(|a, b| scores.get(b).copied().unwrap_or(f32::MIN).total_cmp(&scores.get(a).copied().unwrap_or(f32::MIN)));
                ranked.truncate(MAX_LIST_ITEMS);
                if !ranked.contains(&i) {
                    ranked.pop();
                    ranked.push(i);
                }
                units.retain(|j| ranked.contains(j));
            }
            // The sentence right before the list, when it introduces it ("To do this:").
            if let Some(&first) = same_block.first() {
                if first > doc.start {
                    let prev = &table.units[first - 1];
                    if matches!(prev.kind, UnitKind::Sentence) && prev.text.trim_end().ends_with(':') {
                        units.insert(0, first - 1);
                    }
                }
            }
            Block { units, score, list_total }
        }
        UnitKind::Sentence => {
            // A short paragraph is quoted whole: the sentence that answers often leans on, or is
            // followed by, the one next to it.
            let paragraph_words: usize = same_block.iter().map(|&j| table.units[j].words()).sum();
            let mut units = if same_block.len() <= PARAGRAPH_SENTENCES && paragraph_words <= PARAGRAPH_WORDS {
                same_block.clone()
            } else {
                vec![i]
            };
            let lower = u.text.to_lowercase();
            let leans_back = ANAPHORA.iter().any(|w| lower.starts_with(&format!("{w} ")) || lower.starts_with(&format!("{w},")));
            if units.len() == 1 && leans_back && i > doc.start {
                let prev = &table.units[i - 1];
                if prev.block == u.block && matches!(prev.kind, UnitKind::Sentence) {
                    units.insert(0, i - 1);
                }
            }
            let i = *units.last().unwrap_or(&i);
            let u = &table.units[i];
            // A sentence that ends with a colon announces what follows: bring the list along.
            if u.text.trim_end().ends_with(':') && i + 1 < doc.end {
                let next = &table.units[i + 1];
                if !matches!(next.kind, UnitKind::Sentence) {
                    let list: Vec<usize> = doc.clone().filter(|&j| table.units[j].block == next.block).collect();
                    if list.len() <= MAX_LIST_ITEMS {
                        units.extend(list);
                    }
                }
            }
            Block { units, score, list_total: 0 }
        }
    }
}

