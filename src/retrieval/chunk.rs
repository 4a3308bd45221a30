//! Article blocks -> heading-aware chunks.
//!
//! A chunk is what one [`Passage`](super::Passage) carries into the prompt, so it should be about
//! one thing and small enough that several fit the prompt budget:
//! - sections start at headings of level 1–3 (`#`, `##`, `###`, `<h1>`–`<h3>`); deeper headings
//!   stay inside their section as a line of text;
//! - a section longer than [`MAX_WORDS`] is split at paragraph boundaries (a single overlong
//!   paragraph at sentence boundaries), every piece keeping the section path;
//! - a piece shorter than [`MIN_WORDS`] (an intro sentence, a one-line section) is merged into a
//!   neighbour when the result stays within [`MAX_WORDS`]; the merged chunk takes the section of
//!   its larger part and the smaller part keeps its heading as a line of text, so no heading is lost.

use super::document::Block;

/// Upper bound on a chunk's length in words (a single word longer than this is not split further).
pub const MAX_WORDS: usize = 180;
/// Pieces shorter than this are merged into a neighbour when possible.
pub const MIN_WORDS: usize = 25;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Heading path, e.g. `Exceptions > Who approves`; empty before the first heading.
    pub section: String,
    pub text: String,
}

/// One run of paragraphs from one section.
#[derive(Debug, Clone)]
struct Part {
    section: String,
    /// The innermost heading of the section, shown inline when the part ends up in a chunk whose
    /// section is another one.
    heading: Option<String>,
    paragraphs: Vec<String>,
    words: usize,
}

type Piece = Vec<Part>;

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn piece_words(p: &Piece) -> usize {
    p.iter().map(|part| part.words).sum()
}

/// Splits an article body into chunks, in reading order. `title` lets a leading `# Title` heading
/// that repeats the front matter title be dropped instead of becoming a section.
pub fn chunk_blocks(title: &str, blocks: &[Block]) -> Vec<Chunk> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut stack: Vec<(u8, String)> = Vec::new();
    let mut current = Part { section: String::new(), heading: None, paragraphs: Vec::new(), words: 0 };
    let mut first_block = true;
    for block in blocks {
        match block {
            Block::Heading { level: 1, text } if first_block && text.trim().eq_ignore_ascii_case(title.trim()) => {}
            Block::Heading { level, text } if *level <= 3 => {
                split_section(std::mem::take(&mut current.paragraphs), &current, &mut pieces);
                stack.retain(|(l, _)| l < level);
                stack.push((*level, text.clone()));
                let section = stack.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(" > ");
                current = Part { section, heading: Some(text.clone()), paragraphs: Vec::new(), words: 0 };
            }
            Block::Heading { text, .. } => current.paragraphs.push(text.clone()),
            Block::Paragraph(text) => current.paragraphs.push(text.clone()),
        }
        first_block = false;
    }
    split_section(std::mem::take(&mut current.paragraphs), &current, &mut pieces);
    merge_small(&mut pieces);
    pieces.into_iter().map(render).collect()
}

/// Appends the pieces of one section (its paragraphs packed greedily up to `MAX_WORDS`).
fn split_section(paragraphs: Vec<String>, template: &Part, pieces: &mut Vec<Piece>) {
    let mut units: Vec<String> = Vec::new();
    for p in paragraphs {
        if words(&p) > MAX_WORDS && p.contains('\n') {
            // A long list (or other multi-line block) is split between its lines, never inside one.
            units.extend(split_lines(&p));
        } else if words(&p) > MAX_WORDS {
            units.extend(split_long(&p));
        } else {
            units.push(p);
        }
    }
    let mut part = Part { paragraphs: Vec::new(), words: 0, ..template.clone() };
    for unit in units {
        let w = words(&unit);
        if part.words > 0 && part.words + w > MAX_WORDS {
            let next = Part { paragraphs: Vec::new(), words: 0, ..template.clone() };
            pieces.push(vec![std::mem::replace(&mut part, next)]);
        }
        part.words += w;
        part.paragraphs.push(unit);
    }
    if part.words > 0 {
        pieces.push(vec![part]);
    }
}

/// An overlong multi-line paragraph: its lines packed up to `MAX_WORDS` (a single overlong line
/// is split like a paragraph).
fn split_lines(p: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    let mut n = 0;
    for line in p.lines() {
        let w = words(line);
        if w > MAX_WORDS {
            if !cur.is_empty() {
                out.push(cur.join("\n"));
                cur.clear();
                n = 0;
            }
            out.extend(split_long(line));
            continue;
        }
        if n + w > MAX_WORDS && !cur.is_empty() {
            out.push(cur.join("\n"));
            cur.clear();
            n = 0;
        }
        cur.push(line);
        n += w;
    }
    if !cur.is_empty() {
        out.push(cur.join("\n"));
    }
    out
}

/// An overlong paragraph: sentences packed up to `MAX_WORDS`, and a sentence longer than that cut
/// by words.
fn split_long(p: &str) -> Vec<String> {
    let mut sentences: Vec<&str> = Vec::new();
    let mut start = 0;
    let bytes = p.as_bytes();
    for (i, c) in p.char_indices() {
        if matches!(c, '.' | '!' | '?') && bytes.get(i + 1).is_none_or(|b| b.is_ascii_whitespace()) {
            sentences.push(p[start..=i].trim());
            start = i + 1;
        }
    }
    if start < p.len() {
        sentences.push(p[start..].trim());
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for sentence in sentences {
        for word in sentence.split_whitespace() {
            if cur.len() >= MAX_WORDS {
                out.push(cur.join(" "));
                cur.clear();
            }
            cur.push(word);
        }
        // Prefer to end a piece at a sentence end when the next sentence would not fit anyway.
        if cur.len() > MAX_WORDS * 2 / 3 {
            out.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

fn merge_small(pieces: &mut Vec<Piece>) {
    loop {
        let mut merged = false;
        for i in 0..pieces.len() {
            let w = piece_words(&pieces[i]);
            if w >= MIN_WORDS {
                continue;
            }
            let section = |p: &Piece| p.first().map(|part| part.section.clone()).unwrap_or_default();
            let fits = |j: usize| piece_words(&pieces[j]) + w <= MAX_WORDS;
            let prev = (i > 0 && fits(i - 1)).then(|| i - 1);
            let next = (i + 1 < pieces.len() && fits(i + 1)).then_some(i + 1);
            let same = |j: &usize| section(&pieces[*j]) == section(&pieces[i]);
            // A same-section neighbour first; then an intro joins what it introduces, anything
            // else the section it follows.
            let target = prev
                .filter(same)
                .or(next.filter(same))
                .or(if section(&pieces[i]).is_empty() { next.or(prev) } else { prev.or(next) });
            if let Some(j) = target {
                let small = pieces.remove(i);
                let j = if j > i { j - 1 } else { j };
                if j < i {
                    pieces[j].extend(small);
                } else {
                    let rest = std::mem::replace(&mut pieces[j], small);
                    pieces[j].extend(rest);
                }
                merged = true;
                break;
            }
        }
        if !merged {
            return;
        }
    }
}

fn render(piece: Piece) -> Chunk {
    // Parts of one section are summed: the section with the most words names the chunk.
    let mut totals: Vec<(&str, usize)> = Vec::new();
    for part in &piece {
        match totals.iter_mut().find(|(s, _)| *s == part.section) {
            Some((_, n)) => *n += part.words,
            None => totals.push((&part.section, part.words)),
        }
    }
    let section = totals.iter().max_by_key(|(_, n)| *n).map(|(s, _)| s.to_string()).unwrap_or_default();
    let mut paragraphs: Vec<&str> = Vec::new();
    let mut last_section: Option<&str> = None;
    for part in &piece {
        if part.section != section && last_section != Some(part.section.as_str()) {
            if let Some(h) = &part.heading {
                paragraphs.push(h);
            }
        }
        last_section = Some(&part.section);
        paragraphs.extend(part.paragraphs.iter().map(String::as_str));
    }
    Chunk { section, text: paragraphs.join("\n\n") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(level: u8, t: &str) -> Block {
        Block::Heading { level, text: t.into() }
    }
    fn p(n: usize, w: &str) -> Block {
        Block::Paragraph(vec![w; n].join(" "))
    }

    #[test]
    fn sections_follow_headings_and_small_parts_merge() {
        let blocks = vec![
            h(1, "Refunds"),
            p(10, "intro"),
            h(2, "Annual"),
            p(60, "annual"),
            h(2, "Exceptions"),
            p(50, "exc"),
            h(3, "Who approves"),
            p(5, "who"),
            h(2, "Big"),
            p(150, "big"),
            p(150, "big2"),
        ];
        let chunks = chunk_blocks("Refunds", &blocks);
        let sections: Vec<&str> = chunks.iter().map(|c| c.section.as_str()).collect();
        assert_eq!(sections, ["Annual", "Exceptions", "Big", "Big"]);
        // The intro joined the section it introduces; the tiny sub-section kept its heading inline.
        assert!(chunks[0].text.starts_with("intro"));
        assert!(chunks[1].text.contains("\n\nWho approves\n\nwho"));
        assert!(chunks.iter().all(|c| words(&c.text) <= MAX_WORDS + 2));
    }

    #[test]
    fn nested_paths_and_long_paragraphs() {
        let blocks = vec![h(2, "A"), h(3, "B"), p(400, "x"), h(2, "C"), p(30, "c")];
        let chunks = chunk_blocks("T", &blocks);
        assert!(chunks.len() >= 3);
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.section == "A > B"));
        assert_eq!(chunks.last().unwrap().section, "C");
        assert!(chunks.iter().all(|c| words(&c.text) <= MAX_WORDS));
    }
}
