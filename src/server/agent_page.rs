//! The agent console (`GET /agent`): the handoff queue, one conversation with its citations and
//! guard outcomes, agent assist (reply drafts, summaries, KB drafts) and KB draft approval.
//!
//! Like the customer chat page it is a plain client of the API: the page itself is public (it
//! holds nothing), and its script calls the agent routes with the key the agent pastes in. It is
//! served whole from here (no external assets) under the chat page's Content-Security-Policy, so
//! its script and styles are separate same-origin files whose URLs carry a content hash.

use std::sync::OnceLock;

use axum::extract::RawQuery;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::web::{escape_html, CONTENT_SECURITY_POLICY};
use super::SharedState;

const AGENT_HTML: &str = include_str!("web/agent.html");
const AGENT_JS: &str = include_str!("web/agent.js");
const AGENT_CSS: &str = include_str!("web/agent.css");

pub const PAGE_PATH: &str = "/agent";
pub const JS_PATH: &str = "/assets/agent.js";
pub const CSS_PATH: &str = "/assets/agent.css";

pub fn routes() -> Router<SharedState> {
    Router::new().route(PAGE_PATH, get(page)).route(JS_PATH, get(script)).route(CSS_PATH, get(stylesheet))
}

/// A short hash of this page's assets (independent of the chat page's, so a change to one does
/// not invalidate the other's cache).
fn asset_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let digest = Sha256::new().chain_update(AGENT_JS).chain_update(AGENT_CSS).finalize();
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    })
}

/// The page with its versioned asset URLs filled in.
pub fn render_page() -> String {
    let v = asset_version();
    AGENT_HTML
        .replace("{{css_url}}", &escape_html(&format!("{CSS_PATH}?v={v}")))
        .replace("{{js_url}}", &escape_html(&format!("{JS_PATH}?v={v}")))
}

/// Headers every response of this page carries.
fn common_headers(resp: &mut Response, content_type: &'static str, cache: &'static str) {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

async fn page() -> Response {
    let mut resp = render_page().into_response();
    // Revalidated: a new build changes the asset URLs in it.
    common_headers(&mut resp, "text/html; charset=utf-8", "no-cache");
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

async fn script(RawQuery(query): RawQuery) -> Response {
    asset(AGENT_JS, "text/javascript; charset=utf-8", query)
}

async fn stylesheet(RawQuery(query): RawQuery) -> Response {
    asset(AGENT_CSS, "text/css; charset=utf-8", query)
}

fn asset(body: &'static str, content_type: &'static str, query: Option<String>) -> Response {
    // Only the URL naming the current version may be cached for good; a bare one is revalidated.
    let current = query.is_some_and(|q| q.strip_prefix("v=") == Some(asset_version()));
    let cache = if current { "public, max-age=31536000, immutable" } else { "no-cache" };
    let mut resp = body.into_response();
    common_headers(&mut resp, content_type, cache);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_its_versioned_assets_and_nothing_external() {
        let html = render_page();
        let v = asset_version();
        assert!(html.contains(&format!("src=\"{JS_PATH}?v={v}\"")), "{html}");
        assert!(html.contains(&format!("href=\"{CSS_PATH}?v={v}\"")), "{html}");
        assert!(!html.contains("{{"), "a placeholder was left: {html}");
        for (name, text) in [("agent.html", AGENT_HTML), ("agent.js", AGENT_JS), ("agent.css", AGENT_CSS)] {
            assert!(!text.contains("http://") && !text.contains("https://"), "{name} refers to another site");
        }
        assert!(!AGENT_JS.contains("innerHTML") && !AGENT_JS.contains("insertAdjacentHTML"), "server text must stay text");
    }
}
