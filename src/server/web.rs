//! The customer chat page (`GET /`) and the article view citations link to (`GET /kb/{doc_id}`).
//!
//! The page is a client of the public API like any other: its script posts the conversation to
//! `/v1/chat/completions` and reads the event stream itself. Everything it needs is served from
//! here (nothing external, so it works air-gapped), and HTML goes out under a strict
//! Content-Security-Policy, which is why script and styles are separate same-origin files.
//! The only server-side values put into HTML are HTML-escaped here.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::knowledge::retrieval_error;
use super::{ApiError, SharedState};
use crate::retrieval::Passage;

const CHAT_HTML: &str = include_str!("web/chat.html");
const CHAT_JS: &str = include_str!("web/chat.js");
const CHAT_CSS: &str = include_str!("web/chat.css");

pub const JS_PATH: &str = "/assets/chat.js";
pub const CSS_PATH: &str = "/assets/chat.css";

/// Sent with every HTML page: only same-origin script, style and connections, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn routes() -> Router<SharedState> {
    Router::new().route("/", get(chat_page)).route("/demo/sign-in/{account}", get(demo_sign_in)).route(JS_PATH, get(chat_js)).route(CSS_PATH, get(chat_css)).route("/kb/{doc_id}", get(article))
}

/// Characters that could end an attribute or start markup, as entities.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A short hash of the assets, put in their URLs so browsers may cache them for good.
fn asset_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let digest = Sha256::new().chain_update(CHAT_JS).chain_update(CHAT_CSS).finalize();
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    })
}

async fn chat_page(State(state): State<SharedState>) -> Response {
    let v = asset_version();
    // The handoff message goes in last, so text in it is never taken for a placeholder.
    let html = CHAT_HTML
        .replace("{{css_url}}", &format!("{CSS_PATH}?v={v}"))
        .replace("{{js_url}}", &format!("{JS_PATH}?v={v}"))
        .replace("{{handoff_message}}", &escape_html(&state.config.grounding.handoff_message));
    html_response(StatusCode::OK, html)
}

/// Demo only (`demo_accounts`): the chat page signed in as a demo account, with a customer token
/// good for an hour signed with the configured secret, as a company's own site would sign one.
/// Any account not listed is 404, and with none listed the route does not exist.
async fn demo_sign_in(State(state): State<SharedState>, Path(account): Path<String>) -> Response {
    let access = &state.config.access;
    let (Some(secret), true) = (&access.customer_token_secret, access.demo_accounts.contains(&account)) else {
        return ApiError::not_found("not_found", "no such demo account (the server's `demo_accounts` lists those it may sign in as)").into_response();
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut claims = serde_json::json!({"sub": format!("demo-{account}"), "account_id": account, "iat": now, "exp": now + 3600});
    if let Some(iss) = &access.customer_token_issuer {
        claims["iss"] = serde_json::json!(iss);
    }
    if let Some(aud) = &access.customer_token_audience {
        claims["aud"] = serde_json::json!(aud);
    }
    let token = match jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())) {
        Ok(t) => t,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let v = asset_version();
    let html = CHAT_HTML
        .replacen("<html lang=\"en\">", &format!("<html lang=\"en\" data-customer-token=\"{}\" data-demo-account=\"{}\">", escape_html(&token), escape_html(&account)), 1)
        .replace("{{css_url}}", &format!("{CSS_PATH}?v={v}"))
        .replace("{{js_url}}", &format!("{JS_PATH}?v={v}"))
        .replace("{{handoff_message}}", &escape_html(&state.config.grounding.handoff_message));
    let mut resp = html_response(StatusCode::OK, html);
    // The token is the customer's: never cached or kept by the browser's history of pages.
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn chat_js(RawQuery(query): RawQuery) -> Response {
    asset(CHAT_JS, "text/javascript; charset=utf-8", query)
}

async fn chat_css(RawQuery(query): RawQuery) -> Response {
    asset(CHAT_CSS, "text/css; charset=utf-8", query)
}

fn asset(body: &'static str, content_type: &'static str, query: Option<String>) -> Response {
    // Only the URL naming the current version may be cached forever; a bare URL is revalidated.
    let current = query.is_some_and(|q| q.strip_prefix("v=") == Some(asset_version()));
    let cache = if current { "public, max-age=31536000, immutable" } else { "no-cache" };
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Pages carry configuration and index content that can change under a running server.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Ids as the indexer writes them; anything else cannot name an article and is not looked up.
fn plausible_doc_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One approved article, each chunk a section a citation can point at (`#{doc_id}-{n}`).
async fn article(State(state): State<SharedState>, Path(doc_id): Path<String>) -> Response {
    if !plausible_doc_id(&doc_id) {
        return not_found_page();
    }
    let kb = match state.knowledge() {
        Ok(kb) => kb,
        Err(e) => return error_page(e),
    };
    let id = doc_id.clone();
    match tokio::task::spawn_blocking(move || kb.document(&id)).await {
        Ok(Ok(Some(passages))) if !passages.is_empty() => html_response(StatusCode::OK, render_article(&doc_id, &passages)),
        // Unknown, draft and retired articles all look the same from outside.
        Ok(Ok(_)) => not_found_page(),
        Ok(Err(e)) => error_page(retrieval_error(e)),
        Err(e) => error_page(ApiError::internal(e)),
    }
}

/// The page frame shared by articles and error pages; `title` and `body` are already HTML.
fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · Tallyworks Help Center</title>\n<link rel=\"icon\" href=\"data:,\">\n<link rel=\"stylesheet\" href=\"{CSS_PATH}?v={v}\">\n</head>\n<body>\n\
         <header class=\"site-header\"><p class=\"brand\"><a href=\"/\">Tallyworks <span>Help Center</span></a></p>\
         <a href=\"/\">Back to the chat</a></header>\n{body}\n</body>\n</html>\n",
        v = asset_version()
    )
}

/// The article page: title, date, then one `<section id="{doc_id}-{n}">` per chunk in order.
pub fn render_article(doc_id: &str, passages: &[Passage]) -> String {
    let first = &passages[0];
    let title = escape_html(&first.title);
    let mut body = String::new();
    let _ = write!(body, "<main class=\"article\">\n<h1>{title}</h1>\n");
    if !first.updated.is_empty() {
        let updated = escape_html(&first.updated);
        let _ = writeln!(body, "<p class=\"updated\">Last updated <time datetime=\"{updated}\">{updated}</time></p>");
    }
    let mut previous_section: Option<&str> = None;
    for (position, p) in passages.iter().enumerate() {
        // Chunk ids are `{doc_id}#{n}`; the position stands in for an id of another shape.
        let n = p.chunk_id.rsplit_once('#').map(|(_, n)| n.to_string()).unwrap_or_else(|| position.to_string());
        let _ = writeln!(body, "<section class=\"chunk\" id=\"{}-{}\">", escape_html(doc_id), escape_html(&n));
        // A long section is split into several chunks: its heading is shown once.
        if !p.section.is_empty() && previous_section != Some(p.section.as_str()) {
            let _ = writeln!(body, "<h2>{}</h2>", escape_html(&p.section));
        }
        previous_section = Some(p.section.as_str());
        for paragraph in p.text.split("\n\n").map(str::trim).filter(|t| !t.is_empty()) {
            let _ = writeln!(body, "<p>{}</p>", escape_html(paragraph));
        }
        body.push_str("</section>\n");
    }
    body.push_str("</main>");
    layout(&title, &body)
}

fn not_found_page() -> Response {
    let body = "<main class=\"article not-found\">\n<h1>We could not find that article</h1>\n\
                <p>It may have been moved or retired. <a href=\"/\">Ask the assistant</a> to find the current one.</p>\n</main>";
    html_response(StatusCode::NOT_FOUND, layout("Article not found", body))
}

/// An error from the table, as a page with the same status and Retry-After. Its message is meant
/// for operators (it may name paths and commands), so customers get a plain sentence instead.
fn error_page(e: ApiError) -> Response {
    let sentence = if e.status == StatusCode::SERVICE_UNAVAILABLE {
        "The help center is starting up or being updated. Please try again in a moment."
    } else {
        "Something went wrong on our side. Please try again later."
    };
    let body = format!(
        "<main class=\"article not-found\">\n<h1>The help center is unavailable</h1>\n<p>{sentence}</p>\n<p><a href=\"/\">Back to the chat</a></p>\n</main>"
    );
    let mut resp = html_response(e.status, layout("Unavailable", &body));
    if let Some(secs) = e.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(n: usize, section: &str, text: &str) -> Passage {
        Passage {
            chunk_id: format!("refund-policy#{n}"),
            doc_id: "refund-policy".into(),
            title: "Refund <policy>".into(),
            section: section.into(),
            source: "billing/refund-policy.md".into(),
            product_area: "billing".into(),
            locale: "en".into(),
            updated: "2026-02-01".into(),
            text: text.into(),
            snippet: String::new(),
            score: 0.0,
            relevance: 0.0,
            lexical: 0.0,
            semantic: 0.0,
        }
    }

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape_html(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape_html("plain › text"), "plain › text");
    }

    #[test]
    fn article_has_one_anchored_section_per_chunk() {
        let html = render_article(
            "refund-policy",
            &[
                passage(0, "", "Intro line."),
                passage(1, "Annual plans", "First <b>part</b>.\n\nSecond part."),
                passage(2, "Annual plans", "Same section, next chunk."),
            ],
        );
        assert!(html.contains("<h1>Refund &lt;policy&gt;</h1>"), "{html}");
        assert!(html.contains("<time datetime=\"2026-02-01\">2026-02-01</time>"), "{html}");
        for n in 0..3 {
            assert!(html.contains(&format!("<section class=\"chunk\" id=\"refund-policy-{n}\">")), "{html}");
        }
        assert_eq!(html.matches("<h2>Annual plans</h2>").count(), 1, "{html}");
        assert!(html.contains("<p>First &lt;b&gt;part&lt;/b&gt;.</p>\n<p>Second part.</p>"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
    }

    #[test]
    fn only_indexer_shaped_ids_are_looked_up() {
        assert!(plausible_doc_id("refund-policy-2024"));
        assert!(!plausible_doc_id(""));
        assert!(!plausible_doc_id("../etc/passwd"));
        assert!(!plausible_doc_id("a b"));
        assert!(!plausible_doc_id(&"x".repeat(129)));
    }

    #[test]
    fn assets_have_no_external_urls() {
        for (name, text) in [("chat.html", CHAT_HTML), ("chat.js", CHAT_JS), ("chat.css", CHAT_CSS)] {
            assert!(!text.contains("http://") && !text.contains("https://"), "{name} refers to another site");
        }
    }
}
