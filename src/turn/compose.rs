//! Composing an answer from the selected evidence.
//!
//! An **assembled** answer states facts only by quoting evidence units verbatim: each block as the
//! article has it (a list stays a list, in order, with its markers), followed by its citation
//! marker. The words around the quotes come from a small fixed set: a lead-in naming the article,
//! a connective before each further block, a note when a long list is quoted in part, and the
//! pack's closing offer. Nothing here can state a fact the articles do not.
//!
//! For the **generative** mode the same evidence becomes the model's passages (prompt assembly is
//! in `crate::prompt`).

use crate::retrieval::evidence::{EvidenceTable, UnitKind};
use crate::retrieval::Passage;

use super::evidence::Selection;

/// The fixed words an assembled answer may use around its quotes.
pub mod wording {
    /// Before the first block: `{title}` is the article's title (approved text).
    pub fn lead_in(title: &str, steps: bool) -> String {
        if steps {
            format!("Here are the steps from our help center article “{title}”:")
        } else {
            format!("Here's what our help center article “{title}” says:")
        }
    }
    /// Before a further block of the same article (steps: an ordered list).
    pub const ALSO: &str = "Also:";
    pub const STEPS: &str = "Step by step:";
    /// Before a block of another article.
    pub fn from_article(title: &str) -> String {
        format!("And from “{title}”:")
    }
    /// After a long list quoted in part.
    pub fn list_note(total: usize, title: &str) -> String {
        format!("(That list has {total} items in all; the article “{title}” shows every one.)")
    }
}

/// Renders the blocks of a selection with their markers, between the lead-in (or `lead`, for
/// decisions) and `closing`.
pub fn assemble(table: &EvidenceTable, sel: &Selection, lead: Option<&str>, closing: &str) -> String {
    let mut out = String::new();
    let mut seen_docs: Vec<&str> = Vec::new();
    for (bi, block) in sel.blocks.iter().enumerate() {
        let first = &table.units[block.units[0]];
        let is_list = block.units.iter().any(|&j| !matches!(table.units[j].kind, UnitKind::Sentence));
        let steps = block.units.iter().any(|&j| matches!(&table.units[j].kind, UnitKind::Item { marker } if marker != "-"));
        let intro = if bi == 0 {
            match lead {
                Some(l) => l.to_string(),
                None => wording::lead_in(&first.title, steps),
            }
        } else if seen_docs.contains(&first.doc_id.as_str()) && steps {
            wording::STEPS.to_string()
        } else if seen_docs.contains(&first.doc_id.as_str()) {
            wording::ALSO.to_string()
        } else {
            wording::from_article(&first.title)
        };
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        let marker = marker_text(&sel.cites[bi]);
        out.push_str(&intro);
        if is_list {
            for (k, &j) in block.units.iter().enumerate() {
                let u = &table.units[j];
                out.push('\n');
                match &u.kind {
                    UnitKind::Item { .. } => out.push_str(&u.display()),
                    UnitKind::Row => {
                        out.push_str("- ");
                        out.push_str(&u.text);
                    }
                    UnitKind::Sentence => out.push_str(&u.text),
                }
                if k + 1 == block.units.len() {
                    out.push(' ');
                    out.push_str(&marker);
                }
            }
            if block.list_total > 0 {
                out.push('\n');
                out.push_str(&wording::list_note(block.list_total, &first.title));
            }
        } else {
            out.push(' ');
            let text: Vec<&str> = block.units.iter().map(|&j| table.units[j].text.as_str()).collect();
            out.push_str(&text.join(" "));
            out.push(' ');
            out.push_str(&marker);
        }
        seen_docs.push(first.doc_id.as_str());
    }
    if !closing.trim().is_empty() {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(closing.trim());
    }
    out
}

/// `[1]` or `[1, 2]`.
pub fn marker_text(numbers: &[usize]) -> String {
    let inner: Vec<String> = numbers.iter().map(|n| n.to_string()).collect();
    format!("[{}]", inner.join(", "))
}

/// The selection as the model's passages in generative mode: passage `n` holds the units cited as
/// `[n]`, in reading order, under its article's title and section.
pub fn evidence_passages(table: &EvidenceTable, sel: &Selection) -> Vec<Passage> {
    let mut out: Vec<Passage> = sel.passages.clone();
    for p in &mut out {
        p.text.clear();
    }
    let mut parts: Vec<Vec<(u32, String)>> = vec![Vec::new(); out.len()];
    for (bi, block) in sel.blocks.iter().enumerate() {
        for &j in &block.units {
            let u = &table.units[j];
            let n = out.iter().position(|p| p.chunk_id == u.chunk_id).or_else(|| sel.cites[bi].first().map(|n| n - 1)).unwrap_or(0);
            if let Some(list) = parts.get_mut(n) {
                list.push((u.position, u.display()));
            }
        }
    }
    for (p, mut list) in out.iter_mut().zip(parts) {
        list.sort_by_key(|(pos, _)| *pos);
        list.dedup();
        p.text = list.into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
    }
    out
}

/// Splits a fixed answer into the pieces it is streamed in (a few words each; markers whole).
pub fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut words = 0;
    for (i, part) in text.split_inclusive([' ', '\n']).enumerate() {
        cur.push_str(part);
        words += 1;
        if words >= 4 || part.ends_with('\n') {
            out.push(std::mem::take(&mut cur));
            words = 0;
        }
        let _ = i;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_rebuild_the_text() {
        let t = "Here are the steps:\n1. Go to Settings. [1]\n\nIs there anything else?";
        assert_eq!(pieces(t).concat(), t);
        assert!(pieces(t).iter().all(|p| !p.is_empty()));
        assert_eq!(marker_text(&[1, 3]), "[1, 3]");
    }
}
