//! One plain-HTTP/1.1 exchange on a fresh connection: the outbound calls Helpline makes (webhook
//! deliveries, action backends). A connection per call avoids the stale pooled-connection failures
//! that would show up as spurious retries; these calls are far too few for the handshake to matter.

use std::pin::pin;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where a request goes: host and port to connect to, and `host[:port]` for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub authority: String,
}

/// Sends `request` to `target` and reads the answer: status, headers and at most `max_body` bytes
/// of body (a longer body is an error, never cut short). Dropping the future (a timeout) closes
/// the socket at once.
pub async fn exchange(target: &Target, request: Request<Full<Bytes>>, max_body: usize) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let stream = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(|e| format!("connection to {} failed: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {} failed: {}", target.authority, chain(&e)))?;
    // The connection future does the I/O, so it is polled alongside the exchange rather than
    // spawned.
    let mut conn = pin!(conn);
    let work = async {
        let response = sender.send_request(request).await.map_err(|e| format!("request to {} failed: {}", target.authority, chain(&e)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| format!("the answer of {} could not be read (over {max_body} bytes, or cut off): {e}", target.authority))?
            .to_bytes();
        Ok::<_, String>((parts.status, parts.headers, body))
    };
    let mut work = pin!(work);
    tokio::select! {
        r = &mut work => r,
        c = &mut conn => match c {
            Err(e) => Err(format!("request to {} failed: {}", target.authority, chain(&e))),
            Ok(()) => work.await,
        },
    }
}

/// An error and its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
