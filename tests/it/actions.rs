//! The shipped actions (`docs-corpus/actions.toml`) against the demo Tallyworks backend (the
//! `tallyworks-backend` example, a real HTTP service with its own SQLite, started on loopback):
//! each action's request, as built from the file, is answered by the backend, and the answer is
//! shown through the action's template; backend failures come back as statuses, secrets never
//! appear in the audit form of a request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use helpline::actions::{Actions, Request, SecretSource};
use serde_json::{json, Map, Value};

const TOKEN: &str = "demo-token-for-tests-0123";

struct Backend {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example binary beside this test binary (`cargo test` builds examples too).
fn backend() -> Backend {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples").join("tallyworks-backend");
    assert!(bin.exists(), "{} is missing: `cargo test` builds the examples", bin.display());
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(&bin)
        .args(["--port", "0", "--db"])
        .arg(dir.path().join("demo.db"))
        .env("TALLYWORKS_BACKEND_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    Backend { child, url, _dir: dir }
}

struct Env(String);

impl SecretSource for Env {
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "TALLYWORKS_BACKEND_URL" => Some(self.0.clone()),
            "TALLYWORKS_BACKEND_TOKEN" => Some(TOKEN.into()),
            _ => None,
        }
    }
    fn file(&self, _: &str) -> std::io::Result<String> {
        Err(std::io::Error::other("no secret files here"))
    }
}

/// Sends a built request over a plain socket; returns the status and the JSON body.
fn send(req: &Request) -> (u16, Value) {
    let rest = req.url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let body = req.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n", req.method.as_str(), body.len());
    if req.body.is_some() {
        head.push_str("content-type: application/json\r\n");
    }
    for h in &req.headers {
        head.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(req_timeout(req))).unwrap();
    s.write_all(format!("{head}\r\n{body}").as_bytes()).unwrap();
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return (0, Value::Null);
    }
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn req_timeout(_: &Request) -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

fn args(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()
}

#[test]
fn shipped_actions_run_against_the_demo_backend() {
    let b = backend();
    let actions = Actions::parse(&std::fs::read_to_string(crate::support::root().join("docs-corpus/actions.toml")).unwrap(), &Env(b.url.clone())).unwrap();
    let run = |name: &str, a: &Map<String, Value>| {
        let action = actions.get(name).unwrap();
        assert_eq!(action.check_arguments(a).unwrap(), Vec::<String>::new(), "{name}");
        let req = action.request(a).unwrap();
        assert!(!req.redacted().to_string().contains(TOKEN), "the audit form of {name} holds no secret");
        let (status, body) = send(&req);
        (status, body, action)
    };
    let ann = args(&[("account_id", "acct-1001")]);

    let (status, body, a) = run("plan_and_next_invoice", &ann);
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.render_result(&body).unwrap(), "You are on the Business plan with 19 of 25 seats in use. Your next invoice is $475.00 on 2027-01-01.");

    let (status, body, a) = run("recent_invoices", &ann);
    assert_eq!(status, 200);
    let shown = a.render_result(&body).unwrap();
    assert!(shown.starts_with("Your recent invoices:\n- INV-2026-1101, 2026-11-01: $475.00 (paid) https://billing.tallyworks.example/invoices/INV-2026-1101"), "{shown}");
    assert_eq!(shown.lines().count(), 4, "{shown}");

    let (status, body, a) = run("lockout_status", &ann);
    assert_eq!(status, 200);
    assert!(a.render_result(&body).unwrap().contains("locked"), "{body}");

    let (status, body, a) = run("send_password_reset", &ann);
    assert_eq!(status, 200);
    assert_eq!(a.render_result(&body).unwrap(), "I've sent a password-reset link to a***@acme.example. It is valid for 60 minutes and can be used once.");

    let mut change = ann.clone();
    change.insert("email".into(), json!("ap@acme.example"));
    let (status, body, a) = run("change_billing_email", &change);
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.render_result(&body).unwrap(), "Done: invoices and billing notices now go to ap@acme.example.");
    let bad = a.check_arguments(&args(&[("account_id", "acct-1001"), ("email", "ap at acme")])).unwrap_err();
    assert!(bad.contains("email"), "{bad}");

    // Failures come back as statuses (the turn hands off with the reason), within the timeout.
    for (id, want) in [("acct-404", 404), ("acct-broken", 500), ("acct-slow", 0)] {
        let (status, _, _) = run("plan_and_next_invoice", &args(&[("account_id", id)]));
        assert_eq!(status, want, "{id}");
    }
    // A path argument cannot reach another route: it is one encoded segment.
    let (status, _, _) = run("plan_and_next_invoice", &args(&[("account_id", "acct-1002/../acct-1001")]));
    assert_eq!(status, 404);
    // The wrong token is refused by the backend.
    let mut req = actions.get("plan_and_next_invoice").unwrap().request(&ann).unwrap();
    req.headers.iter_mut().for_each(|h| h.value = "Bearer wrong".into());
    assert_eq!(send(&req).0, 401);
}
