//! One source file -> one [`Article`]: the front matter block, then the body turned into a flat
//! list of [`Block`]s (headings and paragraphs of plain text) whatever the source format was.
//!
//! The front matter parser is deliberately small: `key: value` lines between two `---` lines,
//! `#` comments after whitespace, optional quotes. Anything richer (lists, nesting) is not needed by
//! the corpus and would only hide mistakes.

use std::fmt;

/// The formats the indexer understands, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Text,
    Html,
}

impl Format {
    /// `None` for extensions the indexer does not read.
    pub fn from_path(path: &str) -> Option<Format> {
        let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
        match ext.as_str() {
            "md" | "markdown" => Some(Format::Markdown),
            "txt" => Some(Format::Text),
            "html" | "htm" => Some(Format::Html),
            _ => None,
        }
    }
}

/// Publication state of an article; only `Approved` is ever served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocStatus {
    Approved,
    Draft,
    Retired,
}

impl DocStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DocStatus::Approved => "approved",
            DocStatus::Draft => "draft",
            DocStatus::Retired => "retired",
        }
    }
}

/// The validated front matter of an article.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontMatter {
    pub id: String,
    pub title: String,
    pub status: DocStatus,
    pub updated: String,
    pub product_area: String,
    pub locale: String,
}

/// A piece of the body: headings carry their level (1 = `#`/`<h1>`), paragraphs are plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    Heading { level: u8, text: String },
    Paragraph(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Article {
    pub meta: FrontMatter,
    pub blocks: Vec<Block>,
}

/// Why a file is not an article. The messages are shown to the person who maintains the corpus, so
/// each says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    NotUtf8 { offset: usize },
    /// The file does not start with a `---` line.
    NoFrontMatter,
    UnclosedFrontMatter,
    BadLine { line: usize, text: String },
    MissingKey(&'static str),
    EmptyKey(&'static str),
    BadStatus(String),
    BadDate(String),
    BadId(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotUtf8 { offset } => write!(f, "bad encoding: not valid UTF-8 (first bad byte at offset {offset}); save the file as UTF-8"),
            ParseError::NoFrontMatter => write!(f, "not an article: no front matter (the file must start with a `---` line)"),
            ParseError::UnclosedFrontMatter => write!(f, "broken front matter: no closing `---` line"),
            ParseError::BadLine { line, text } => write!(f, "broken front matter: line {line} is not `key: value`: {text:?}"),
            ParseError::MissingKey(k) => write!(f, "broken front matter: missing required key `{k}`"),
            ParseError::EmptyKey(k) => write!(f, "broken front matter: key `{k}` is empty"),
            ParseError::BadStatus(s) => write!(f, "broken front matter: status {s:?} is not one of approved, draft, retired"),
            ParseError::BadDate(s) => write!(f, "broken front matter: updated {s:?} is not an ISO date (YYYY-MM-DD)"),
            ParseError::BadId(s) => write!(f, "bad id {s:?}: ids are kebab-case (lowercase letters, digits and single hyphens, e.g. `refund-policy`)"),
        }
    }
}

/// Parses the bytes of one file. `Err(NoFrontMatter)` lets the caller tell READMEs from broken
/// articles.
pub fn parse(bytes: &[u8], format: Format) -> Result<Article, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ParseError::NotUtf8 { offset: e.valid_up_to() })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (meta, body) = split_front_matter(text)?;
    let blocks = match format {
        Format::Markdown => markdown_blocks(body),
        Format::Text => text_blocks(body),
        Format::Html => crate::retrieval::html::html_blocks(body),
    };
    Ok(Article { meta, blocks })
}

fn split_front_matter(text: &str) -> Result<(FrontMatter, &str), ParseError> {
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or("");
    if first.trim_end() != "---" {
        return Err(ParseError::NoFrontMatter);
    }
    let mut consumed = first.len();
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut closed = false;
    for (i, raw) in lines.enumerate() {
        consumed += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim_end() == "---" {
            closed = true;
            break;
        }
        let content = strip_comment(line).trim();
        if content.is_empty() {
            continue;
        }
        let Some((key, value)) = content.split_once(':') else {
            return Err(ParseError::BadLine { line: i + 2, text: line.to_string() });
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(ParseError::BadLine { line: i + 2, text: line.to_string() });
        }
        pairs.push((key.to_ascii_lowercase(), unquote(value.trim()).to_string()));
    }
    if !closed {
        return Err(ParseError::UnclosedFrontMatter);
    }
    // A repeated key keeps its last value, as YAML readers commonly do.
    let get = |k: &'static str| pairs.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let required = |k: &'static str| match get(k) {
        None => Err(ParseError::MissingKey(k)),
        Some("") => Err(ParseError::EmptyKey(k)),
        Some(v) => Ok(v.to_string()),
    };
    let id = required("id")?;
    if !is_kebab_case(&id) {
        return Err(ParseError::BadId(id));
    }
    let title = required("title")?;
    let status = match required("status")?.as_str() {
        "approved" => DocStatus::Approved,
        "draft" => DocStatus::Draft,
        "retired" => DocStatus::Retired,
        other => return Err(ParseError::BadStatus(other.to_string())),
    };
    let updated = required("updated")?;
    if !is_iso_date(&updated) {
        return Err(ParseError::BadDate(updated));
    }
    let product_area = required("product_area")?;
    let locale = match get("locale") {
        None | Some("") => "en".to_string(),
        Some(l) => l.to_ascii_lowercase(),
    };
    Ok((FrontMatter { id, title, status, updated, product_area, locale }, &text[consumed.min(text.len())..]))
}

/// Drops a `#` comment that follows whitespace and is not inside quotes (so `C#` and `"a # b"` survive).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev_space => return &line[..i],
            None => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

pub fn is_kebab_case(id: &str) -> bool {
    !id.is_empty()
        && id.split('-').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

fn is_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        let part = &s[r];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse::<u32>().ok()
        } else {
            None
        }
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else { return false };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// Plain text: paragraphs separated by blank lines; a line starting with `#`s and a space (such as
/// `## Heading`) is a heading, the one convention plain-text help articles use for sections.
/// Everything else is kept verbatim.
fn text_blocks(body: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut para: Vec<&str> = Vec::new();
    for line in body.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            flush_paragraph(&mut para, &mut blocks);
        } else if let Some((level, text)) = atx_heading(trimmed).filter(|(_, t)| !t.is_empty()) {
            flush_paragraph(&mut para, &mut blocks);
            blocks.push(Block::Heading { level, text: text.to_string() });
        } else {
            para.push(trimmed);
        }
    }
    flush_paragraph(&mut para, &mut blocks);
    blocks
}

fn flush_paragraph(para: &mut Vec<&str>, blocks: &mut Vec<Block>) {
    if !para.is_empty() {
        blocks.push(Block::Paragraph(para.join("\n")));
        para.clear();
    }
}

/// Markdown: ATX headings (`#`..`######`) become headings, blank lines and fences separate
/// paragraphs, inline markup (emphasis, code ticks, links, images) is reduced to its text. List
/// items keep their `- ` so the model still sees a list.
fn markdown_blocks(body: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut para: Vec<String> = Vec::new();
    let mut in_fence = false;
    let flush = |para: &mut Vec<String>, blocks: &mut Vec<Block>| {
        if !para.is_empty() {
            blocks.push(Block::Paragraph(para.join("\n")));
            para.clear();
        }
    };
    for line in body.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            flush(&mut para, &mut blocks);
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            // Code keeps its text verbatim: commands and identifiers are what people search for.
            para.push(line.to_string());
            continue;
        }
        if trimmed.is_empty() {
            flush(&mut para, &mut blocks);
            continue;
        }
        if let Some((level, text)) = atx_heading(trimmed) {
            flush(&mut para, &mut blocks);
            let text = inline_markdown(text);
            if !text.is_empty() {
                blocks.push(Block::Heading { level, text });
            }
            continue;
        }
        if is_rule(trimmed) {
            flush(&mut para, &mut blocks);
            continue;
        }
        let mut content = trimmed;
        while let Some(rest) = content.strip_prefix('>') {
            content = rest.trim_start();
        }
        if content.is_empty() {
            continue;
        }
        let (bullet, item) = list_marker(content);
        let text = inline_markdown(item);
        para.push(if bullet { format!("- {text}") } else { text });
    }
    flush(&mut para, &mut blocks);
    blocks
}

fn atx_heading(line: &str) -> Option<(u8, &str)> {
    let hashes = line.bytes().take_while(|&b| b == b'#').count();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = &line[hashes..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None; // `#hashtag` is text
    }
    Some((hashes as u8, rest.trim().trim_end_matches('#').trim()))
}

fn is_rule(line: &str) -> bool {
    let chars: Vec<char> = line.chars().filter(|c| !c.is_whitespace()).collect();
    chars.len() >= 3 && ['-', '*', '_'].iter().any(|m| chars.iter().all(|c| c == m))
}

/// Recognises `- `, `* `, `+ ` and `1. ` list items; ordered items keep their number.
fn list_marker(line: &str) -> (bool, &str) {
    for m in ["- ", "* ", "+ "] {
        if let Some(rest) = line.strip_prefix(m) {
            return (true, rest.trim_start());
        }
    }
    (false, line)
}

/// Reduces inline Markdown to its visible text.
pub(crate) fn inline_markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() && chars[i + 1].is_ascii_punctuation() => {
                out.push(chars[i + 1]);
                i += 2;
                continue;
            }
            '*' | '`' => {
                i += 1;
                continue;
            }
            // `_` marks emphasis only at word edges; inside snake_case names it is text.
            '_' => {
                let prev_word = i > 0 && chars[i - 1].is_alphanumeric();
                let next_word = i + 1 < chars.len() && chars[i + 1].is_alphanumeric();
                if prev_word && next_word {
                    out.push('_');
                }
                i += 1;
                continue;
            }
            '!' if chars.get(i + 1) == Some(&'[') => {
                i += 1;
                continue;
            }
            '[' => {
                if let Some((text_end, url_end)) = link_span(&chars, i) {
                    let inner: String = chars[i + 1..text_end].iter().collect();
                    out.push_str(&inline_markdown(&inner));
                    i = url_end + 1;
                    continue;
                }
            }
            '<' => {
                // Inline HTML tags and autolinks: keep an autolink's address, drop tags.
                if let Some(end) = chars[i..].iter().position(|&c| c == '>') {
                    let inner: String = chars[i + 1..i + end].iter().collect();
                    if inner.contains("://") || inner.contains('@') {
                        out.push_str(&inner);
                    }
                    i += end + 1;
                    continue;
                }
            }
            _ => {}
        }
        out.push(c);
        i += 1;
    }
    out.trim().to_string()
}

/// For `[text](url)` starting at `open`, the index of `]` and of the closing `)`.
fn link_span(chars: &[char], open: usize) -> Option<(usize, usize)> {
    let close = open + chars[open..].iter().position(|&c| c == ']')?;
    if chars.get(close + 1) != Some(&'(') {
        return None;
    }
    let end = close + 1 + chars[close + 1..].iter().position(|&c| c == ')')?;
    Some((close, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FM: &str = "---\nid: refund-policy   # comment\ntitle: \"Refund policy\"\nstatus: approved\nupdated: 2026-02-01\nproduct_area: billing\n---\n";

    #[test]
    fn front_matter_strips_comments_and_quotes_and_defaults_locale() {
        let a = parse(format!("{FM}Body text.\n").as_bytes(), Format::Markdown).unwrap();
        assert_eq!(a.meta.id, "refund-policy");
        assert_eq!(a.meta.title, "Refund policy");
        assert_eq!(a.meta.locale, "en");
        assert_eq!(a.blocks, vec![Block::Paragraph("Body text.".into())]);
    }

    #[test]
    fn front_matter_errors_name_the_problem() {
        let cases: &[(&str, ParseError)] = &[
            ("no fm\n", ParseError::NoFrontMatter),
            ("---\nid: a\n", ParseError::UnclosedFrontMatter),
            ("---\nid a\n---\n", ParseError::BadLine { line: 2, text: "id a".into() }),
            ("---\ntitle: T\n---\n", ParseError::MissingKey("id")),
            ("---\nid: ''\n---\n", ParseError::EmptyKey("id")),
            ("---\nid: Bad_Id\n---\n", ParseError::BadId("Bad_Id".into())),
            ("---\nid: a\ntitle: T\nstatus: live\n---\n", ParseError::BadStatus("live".into())),
            ("---\nid: a\ntitle: T\nstatus: draft\nupdated: 2026-02-30\n---\n", ParseError::BadDate("2026-02-30".into())),
        ];
        for (src, want) in cases {
            assert_eq!(parse(src.as_bytes(), Format::Markdown).unwrap_err(), *want, "{src:?}");
        }
        assert_eq!(parse(b"---\n\xff\n---\n", Format::Text).unwrap_err(), ParseError::NotUtf8 { offset: 4 });
    }

    #[test]
    fn dates_and_ids() {
        assert!(is_iso_date("2024-02-29") && !is_iso_date("2023-02-29") && !is_iso_date("2024-13-01") && !is_iso_date("2024-1-01"));
        assert!(is_kebab_case("api-rate-limits-v1") && !is_kebab_case("a--b") && !is_kebab_case("-a") && !is_kebab_case("A"));
    }

    #[test]
    fn markdown_inline_markup_is_dropped() {
        let a = parse(
            format!("{FM}# Title\n\nGo to **Settings → Billing** and [click here](https://x.y).\n\n## Exceptions\n\n- item `one`\n- snake_case _em_\n").as_bytes(),
            Format::Markdown,
        )
        .unwrap();
        assert_eq!(
            a.blocks,
            vec![
                Block::Heading { level: 1, text: "Title".into() },
                Block::Paragraph("Go to Settings → Billing and click here.".into()),
                Block::Heading { level: 2, text: "Exceptions".into() },
                Block::Paragraph("- item one\n- snake_case em".into()),
            ]
        );
    }

    #[test]
    fn text_is_paragraphs() {
        let a = parse(format!("{FM}one **two**\n- three\n\n\n## Four\nfive\n").as_bytes(), Format::Text).unwrap();
        assert_eq!(
            a.blocks,
            vec![
                Block::Paragraph("one **two**\n- three".into()),
                Block::Heading { level: 2, text: "Four".into() },
                Block::Paragraph("five".into()),
            ]
        );
    }
}
