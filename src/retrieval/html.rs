//! HTML body -> [`Block`]s: a small tag scanner, not a DOM. Help-center exports are simple
//! documents; what matters is that markup never reaches the index or the prompt, that hidden
//! content (`<script>`, `<style>`, `<head>`) is dropped, and that headings still split sections.

use super::document::Block;

/// Elements whose whole content is dropped.
const HIDDEN: &[&str] = &["script", "style", "head", "template", "noscript", "svg"];

/// Elements that end the current paragraph.
const BLOCKS: &[&str] = &[
    "p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "blockquote", "pre", "hr", "table",
    "thead", "tbody", "tfoot", "ul", "ol", "dl", "figure", "figcaption", "form", "fieldset", "details", "summary",
    "address", "body", "html",
];

/// Elements that start a new line inside the current paragraph.
const LINES: &[&str] = &["br", "tr", "dt", "dd", "caption"];

pub fn html_blocks(html: &str) -> Vec<Block> {
    let mut out = Builder::default();
    let mut rest = html;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            out.text(rest);
            break;
        };
        out.text(&rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |e| &after[e + 3..]);
            continue;
        }
        let Some(tag) = Tag::parse(rest) else {
            // A lone `<` (e.g. "a < b") is text.
            out.text("<");
            rest = &rest[1..];
            continue;
        };
        rest = &rest[tag.len..];
        let name = tag.name.as_str();
        if !tag.closing && HIDDEN.contains(&name) {
            rest = skip_element(rest, name);
            continue;
        }
        if let Some(level) = heading_level(name) {
            if tag.closing {
                out.end_heading();
            } else {
                out.start_heading(level);
            }
        } else if name == "li" {
            if !tag.closing {
                out.line_break();
                out.buf.push_str("- ");
            }
        } else if name == "td" || name == "th" {
            out.buf.push(' ');
        } else if BLOCKS.contains(&name) {
            out.flush();
        } else if LINES.contains(&name) {
            out.line_break();
        }
        // Inline elements (a, strong, em, code, span, ...) only lose their tags.
    }
    out.flush();
    out.blocks
}

fn heading_level(name: &str) -> Option<u8> {
    match name.as_bytes() {
        [b'h', d @ b'1'..=b'6'] => Some(d - b'0'),
        _ => None,
    }
}

/// Returns the text after `</name>` (case-insensitive), or "" when the element never closes.
fn skip_element<'a>(rest: &'a str, name: &str) -> &'a str {
    let lower = rest.to_ascii_lowercase();
    let needle = format!("</{name}");
    let mut from = 0;
    while let Some(at) = lower[from..].find(&needle).map(|a| a + from) {
        let end = at + needle.len();
        // `</head` must not match `</header`.
        if !lower.as_bytes().get(end).is_some_and(|b| b.is_ascii_alphanumeric()) {
            let after = &rest[at..];
            return after.find('>').map_or("", |gt| &after[gt + 1..]);
        }
        from = end;
    }
    ""
}

struct Tag {
    name: String,
    closing: bool,
    /// Bytes from `<` to the closing `>` inclusive.
    len: usize,
}

impl Tag {
    /// Parses a tag at the start of `s` (which begins with `<`); `None` when it is not a tag.
    fn parse(s: &str) -> Option<Tag> {
        let bytes = s.as_bytes();
        let mut i = 1;
        let closing = bytes.get(i) == Some(&b'/');
        if closing {
            i += 1;
        }
        // Doctype and processing instructions are dropped like tags with no meaning.
        let special = matches!(bytes.get(i), Some(b'!') | Some(b'?'));
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || (special && i == start)) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let name = s[start..i].to_ascii_lowercase();
        // Find the `>` that ends the tag, skipping quoted attribute values.
        let mut quote = None;
        while i < bytes.len() {
            match (quote, bytes[i]) {
                (Some(q), c) if c == q => quote = None,
                (None, b'"') | (None, b'\'') => quote = Some(bytes[i]),
                (None, b'>') => return Some(Tag { name, closing, len: i + 1 }),
                _ => {}
            }
            i += 1;
        }
        None
    }
}

#[derive(Default)]
struct Builder {
    blocks: Vec<Block>,
    buf: String,
    heading: Option<u8>,
}

impl Builder {
    fn text(&mut self, raw: &str) {
        if !raw.is_empty() {
            self.buf.push_str(&decode_entities(raw));
        }
    }

    fn line_break(&mut self) {
        self.buf.push('\n');
    }

    fn start_heading(&mut self, level: u8) {
        self.flush();
        self.heading = Some(level);
    }

    fn end_heading(&mut self) {
        if self.heading.is_some() {
            self.flush();
        }
    }

    /// Ends the current paragraph (or heading): whitespace collapsed within lines, empty lines dropped.
    fn flush(&mut self) {
        let text = self
            .buf
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty() && l != "-")
            .collect::<Vec<_>>()
            .join("\n");
        self.buf.clear();
        match self.heading.take() {
            Some(level) if !text.is_empty() => self.blocks.push(Block::Heading { level, text: text.replace('\n', " ") }),
            _ if !text.is_empty() => self.blocks.push(Block::Paragraph(text)),
            _ => {}
        }
    }
}

/// Decodes character references: numeric ones and the named ones help-center pages use. Unknown
/// names stay as written rather than guessing.
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '#')).map(|e| e + 1);
        let decoded = match end {
            Some(e) if rest.as_bytes()[e] == b';' => entity(&rest[1..e]).map(|c| (c, e + 1)),
            _ => None,
        };
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code).filter(|&c| c != '\0');
    }
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => ' ',
        "ndash" => '–',
        "mdash" => '—',
        "hellip" => '…',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "bull" => '•',
        "middot" => '·',
        "rarr" => '→',
        "larr" => '←',
        "times" => '×',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "deg" => '°',
        "sect" => '§',
        "para" => '¶',
        "shy" => '\u{ad}',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_hidden_content_and_entities() {
        let html = "<!DOCTYPE html><html><head><title>x</title><style>p{}</style></head><body>\
            <h1>Refund &amp; returns</h1><p>First <b>para</b>&nbsp;here &#8212; &#x2192; &bogus; a < b</p>\
            <script>var x = '<p>no</p>';</script><!-- hidden --><h2>Annual <em>plans</em></h2>\
            <ul><li>one</li><li>two</li></ul><div>after<br>break</div><h3>Deep</h3><p>x</p></body></html>";
        assert_eq!(
            html_blocks(html),
            vec![
                Block::Heading { level: 1, text: "Refund & returns".into() },
                Block::Paragraph("First para here — → &bogus; a < b".into()),
                Block::Heading { level: 2, text: "Annual plans".into() },
                Block::Paragraph("- one\n- two".into()),
                Block::Paragraph("after\nbreak".into()),
                Block::Heading { level: 3, text: "Deep".into() },
                Block::Paragraph("x".into()),
            ]
        );
    }
}
