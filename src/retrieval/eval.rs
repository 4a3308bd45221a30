//! Retrieval quality on a question set (`eval/grounding.jsonl`): recall@k and MRR for answerable
//! questions, and how well the relevance gate refuses the unanswerable ones.
//!
//! One JSON object per line: `{"id":"q001","turns":["..."],"relevant":["doc-id"]}`. The last turn
//! is the question evaluated, earlier turns are the conversation before it (passed to
//! [`KnowledgeBase::search_turn`]); `relevant: []` marks a question the corpus cannot answer.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Filters, KnowledgeBase, RetrievalError};

/// Ranks looked at: MRR is capped here, recall@k uses its prefixes.
pub const EVAL_DEPTH: usize = 10;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EvalCase {
    pub id: String,
    pub turns: Vec<String>,
    pub relevant: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} line {line}: {reason}")]
    Parse { path: String, line: usize, reason: String },
    #[error(transparent)]
    Retrieval(#[from] RetrievalError),
}

/// Reads a question file; a line that is not a valid case is an error naming the line.
pub fn load_cases(path: &Path) -> Result<Vec<EvalCase>, EvalError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: shown.clone(), source })?;
    let mut cases = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: EvalCase = serde_json::from_str(line).map_err(|e| EvalError::Parse { path: shown.clone(), line: i + 1, reason: e.to_string() })?;
        if case.turns.is_empty() {
            return Err(EvalError::Parse { path: shown.clone(), line: i + 1, reason: "`turns` is empty".into() });
        }
        cases.push(case);
    }
    Ok(cases)
}

/// What one case retrieved, kept so that thresholds can be swept without searching again.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub question: String,
    pub relevant: Vec<String>,
    /// Doc ids of the passages, in rank order (a doc may appear twice).
    pub ranked: Vec<String>,
    /// Best passage relevance (0 when nothing was found).
    pub top_relevance: f32,
}

impl CaseResult {
    fn answerable(&self) -> bool {
        !self.relevant.is_empty()
    }
    /// 1-based rank of the first passage from a relevant doc.
    fn first_hit(&self) -> Option<usize> {
        self.ranked.iter().position(|d| self.relevant.contains(d)).map(|i| i + 1)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissKind {
    /// Answerable, but no relevant doc in the top 5.
    NotInTop5,
    /// Answerable, but the gate refused it.
    FalseRefusal,
    /// Unanswerable, but the gate let it through.
    NotRefused,
}

#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    pub id: String,
    pub kind: MissKind,
    pub question: String,
    pub expected: Vec<String>,
    /// Doc ids of the top 5 passages.
    pub got: Vec<String>,
    pub top_relevance: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalEval {
    pub recall_at_1: f64,
    pub recall_at_3: f64,
    pub recall_at_5: f64,
    /// Mean reciprocal rank of the first relevant doc (0 beyond rank 10).
    pub mrr: f64,
    /// Refused ∩ unanswerable / refused (1 when nothing was refused).
    pub refusal_precision: f64,
    /// Refused ∩ unanswerable / unanswerable (1 when there are no unanswerable cases).
    pub refusal_recall: f64,
    /// Share of cases where the gate decided right (answerable passed, unanswerable refused).
    pub gate_accuracy: f64,
    pub answerable: usize,
    pub unanswerable: usize,
    pub min_score: f32,
    pub misses: Vec<Miss>,
    #[serde(skip)]
    pub cases: Vec<CaseResult>,
}

/// Searches every case (with its earlier turns) and scores the results at gate `min_score`.
pub fn evaluate(kb: &KnowledgeBase, cases: &[EvalCase], min_score: f32) -> Result<RetrievalEval, RetrievalError> {
    evaluate_weighted(kb, cases, min_score, super::EARLIER_TURN_WEIGHT)
}

/// [`evaluate`] with an explicit weight for earlier turns (for calibration).
pub fn evaluate_weighted(kb: &KnowledgeBase, cases: &[EvalCase], min_score: f32, earlier_weight: f32) -> Result<RetrievalEval, RetrievalError> {
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        let (question, earlier) = case.turns.split_last().map(|(q, e)| (q.as_str(), e)).unwrap_or(("", &[]));
        let earlier: Vec<&str> = earlier.iter().map(String::as_str).collect();
        let passages = kb.search_turn_weighted(question, &earlier, earlier_weight, EVAL_DEPTH, &Filters::default())?;
        results.push(CaseResult {
            id: case.id.clone(),
            question: question.to_string(),
            relevant: case.relevant.clone(),
            ranked: passages.iter().map(|p| p.doc_id.clone()).collect(),
            // The gate's measure: `is_relevant(passages, t)` is `top_relevance >= t`.
            top_relevance: passages.iter().map(|p| p.relevance).fold(0.0, f32::max),
        });
    }
    Ok(score(results, min_score))
}

/// Metrics of already retrieved cases at gate `min_score`.
pub fn score(cases: Vec<CaseResult>, min_score: f32) -> RetrievalEval {
    let answerable: Vec<&CaseResult> = cases.iter().filter(|c| c.answerable()).collect();
    let unanswerable = cases.len() - answerable.len();
    let share = |n: usize, of: usize| if of == 0 { 1.0 } else { n as f64 / of as f64 };
    let recall = |k: usize| share(answerable.iter().filter(|c| c.first_hit().is_some_and(|r| r <= k)).count(), answerable.len());
    let mrr = if answerable.is_empty() { 0.0 } else { answerable.iter().map(|c| c.first_hit().map_or(0.0, |r| 1.0 / r as f64)).sum::<f64>() / answerable.len() as f64 };
    let refused = |c: &CaseResult| c.top_relevance < min_score;
    let refused_n = cases.iter().filter(|c| refused(c)).count();
    let correct_refusals = cases.iter().filter(|c| refused(c) && !c.answerable()).count();
    let correct = cases.iter().filter(|c| refused(c) != c.answerable()).count();
    let mut misses = Vec::new();
    for c in &cases {
        let kind = match (c.answerable(), refused(c)) {
            (true, _) if c.first_hit().is_none_or(|r| r > 5) => Some(MissKind::NotInTop5),
            (true, true) => Some(MissKind::FalseRefusal),
            (false, false) => Some(MissKind::NotRefused),
            _ => None,
        };
        if let Some(kind) = kind {
            misses.push(Miss {
                id: c.id.clone(),
                kind,
                question: c.question.clone(),
                expected: c.relevant.clone(),
                got: c.ranked.iter().take(5).cloned().collect(),
                top_relevance: c.top_relevance,
            });
        }
    }
    RetrievalEval {
        recall_at_1: recall(1),
        recall_at_3: recall(3),
        recall_at_5: recall(5),
        mrr,
        refusal_precision: share(correct_refusals, refused_n),
        refusal_recall: share(correct_refusals, unanswerable),
        gate_accuracy: share(correct, cases.len()),
        answerable: answerable.len(),
        unanswerable,
        min_score,
        misses,
        cases,
    }
}

impl std::fmt::Display for RetrievalEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} answerable, {} unanswerable questions; gate min_score {:.2}", self.answerable, self.unanswerable, self.min_score)?;
        writeln!(f, "recall@1 {:.3}  recall@3 {:.3}  recall@5 {:.3}  MRR {:.3}", self.recall_at_1, self.recall_at_3, self.recall_at_5, self.mrr)?;
        writeln!(
            f,
            "refusal precision {:.3}  refusal recall {:.3}  gate accuracy {:.3}",
            self.refusal_precision, self.refusal_recall, self.gate_accuracy
        )?;
        for m in &self.misses {
            let kind = match m.kind {
                MissKind::NotInTop5 => "not in top 5",
                MissKind::FalseRefusal => "refused but answerable",
                MissKind::NotRefused => "answered but unanswerable",
            };
            writeln!(f, "miss {} ({kind}, relevance {:.2}): {:?} expected {:?} got {:?}", m.id, m.top_relevance, m.question, m.expected, m.got)?;
        }
        Ok(())
    }
}
