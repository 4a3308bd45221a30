//! A small W3C WebDriver client (blocking HTTP/1.1 over std `TcpStream`, JSON with serde_json) and
//! a headless Chromium driven through `chromedriver`. Run it on a blocking thread (`spawn_blocking`)
//! so the test server keeps being polled meanwhile.
//!
//! Chromium and chromedriver come from the Debian packages `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs; missing, they make the test fail (never skip) with that advice.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub const ENTER: &str = "\u{E007}";
pub const TAB: &str = "\u{E004}";

const INSTALL_HINT: &str = "the browser tests need Chromium and chromedriver (Debian packages `chromium` and `chromium-driver`): \
     run `scripts/test.sh`, which installs them, or install them yourself";

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn chromedriver_path() -> PathBuf {
    std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| on_path("chromedriver"))
        .unwrap_or_else(|| panic!("chromedriver not found: {INSTALL_HINT}"))
}

fn chromium_path() -> PathBuf {
    std::env::var_os("CHROME_BIN")
        .map(PathBuf::from)
        .or_else(|| ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|n| on_path(n)))
        .unwrap_or_else(|| panic!("Chromium not found: {INSTALL_HINT}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

/// One `chromedriver` process, in its own process group; dropping it (also while unwinding from a
/// failed assertion) kills that group, so no driver or browser outlives the test.
pub struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    pub fn start() -> ChromeDriver {
        use std::os::unix::process::CommandExt;
        let exe = chromedriver_path();
        let port = free_port();
        let child = Command::new(&exe)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", exe.display()));
        let driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, body)) = http(port, "GET", "/status", None) {
                if body["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A fresh headless browser with its own temporary profile.
    pub fn session(&self) -> Session {
        let profile = tempfile::tempdir().expect("temp profile dir");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--disable-gpu".to_string(),
            "--no-first-run".to_string(),
            "--window-size=1024,800".to_string(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium_path(), "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let value = command(self.port, "POST", "/session", Some(&caps)).unwrap_or_else(|e| panic!("cannot start a browser session: {e}"));
        let id = value["sessionId"].as_str().expect("a session id").to_string();
        Session { port: self.port, id, _profile: profile }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and any browser it started.
        let _ = Command::new("kill").args(["-s", "KILL", "--"]).arg(format!("-{}", self.child.id())).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session; dropping it closes the browser.
pub struct Session {
    port: u16,
    id: String,
    _profile: tempfile::TempDir,
}

/// An element reference of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(pub String);

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let full = format!("/session/{}{path}", self.id);
        command(self.port, method, &full, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })));
    }

    pub fn current_url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    pub fn back(&self) {
        self.cmd("POST", "/back", Some(&json!({})));
    }

    /// All elements matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self.cmd("POST", "/elements", Some(&json!({"using": "css selector", "value": css})));
        v.as_array().into_iter().flatten().filter_map(|e| e[ELEMENT_KEY].as_str()).map(|s| Element(s.to_string())).collect()
    }

    pub fn find(&self, css: &str) -> Option<Element> {
        self.find_all(css).into_iter().next()
    }

    /// The first match, or a failed test naming the selector.
    pub fn get(&self, css: &str) -> Element {
        self.find(css).unwrap_or_else(|| panic!("no element matches {css:?} on {}", self.current_url()))
    }

    pub fn text(&self, el: &Element) -> String {
        self.cmd("GET", &format!("/element/{}/text", el.0), None).as_str().unwrap_or_default().to_string()
    }

    pub fn attribute(&self, el: &Element, name: &str) -> Option<String> {
        self.cmd("GET", &format!("/element/{}/attribute/{name}", el.0), None).as_str().map(str::to_string)
    }

    pub fn property(&self, el: &Element, name: &str) -> Value {
        self.cmd("GET", &format!("/element/{}/property/{name}", el.0), None)
    }

    /// A computed CSS value, e.g. `rgb(11, 93, 107)`.
    pub fn css(&self, el: &Element, property: &str) -> String {
        self.cmd("GET", &format!("/element/{}/css/{property}", el.0), None).as_str().unwrap_or_default().to_string()
    }

    pub fn displayed(&self, el: &Element) -> bool {
        self.cmd("GET", &format!("/element/{}/displayed", el.0), None) == true
    }

    pub fn click(&self, el: &Element) {
        self.cmd("POST", &format!("/element/{}/click", el.0), Some(&json!({})));
    }

    /// Types into the element (focusing it first); special keys such as [`ENTER`] included.
    pub fn send_keys(&self, el: &Element, text: &str) {
        self.cmd("POST", &format!("/element/{}/value", el.0), Some(&json!({ "text": text })));
    }

    /// One key press on whatever has focus.
    pub fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}
        ]}]});
        self.cmd("POST", "/actions", Some(&actions));
    }

    pub fn active_element(&self) -> Element {
        let v = self.cmd("GET", "/element/active", None);
        Element(v[ELEMENT_KEY].as_str().expect("an active element").to_string())
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(&json!({ "script": script, "args": args })))
    }

    /// The browser console since the last call (Chrome's log extension to WebDriver).
    pub fn console(&self) -> Vec<Value> {
        let v = self.cmd("POST", "/se/log", Some(&json!({"type": "browser"})));
        v.as_array().cloned().unwrap_or_default()
    }

    /// Polls `probe` every 50 ms until it returns `Some`, failing the test after `limit`.
    pub fn wait_for<T>(&self, limit: Duration, what: &str, mut probe: impl FnMut(&Session) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "waited {limit:?} for {what} on {}", self.current_url());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = command(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// A WebDriver command: its `value`, or the error WebDriver reported.
fn command(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let (status, v) = http(port, method, path, body)?;
    if status == 200 {
        Ok(v["value"].clone())
    } else {
        Err(format!("{status} {}: {}", v["value"]["error"], v["value"]["message"]))
    }
}

/// One HTTP/1.1 exchange with chromedriver. It answers `Connection: close` yet leaves the socket
/// open, so the body is read by its `Content-Length` (or chunked framing), not to EOF.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut read_more = |raw: &mut Vec<u8>| -> Result<bool, String> {
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        raw.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    };
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if !read_more(&mut raw)? {
            return Err("connection closed before a response head".into());
        }
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let header =
        |name: &str| head.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string());
    let start = split + 4;
    let payload = if header("transfer-encoding").is_some_and(|v| v == "chunked") {
        while !raw[start..].windows(5).any(|w| w == b"0\r\n\r\n") {
            if !read_more(&mut raw)? {
                break;
            }
        }
        dechunk(&raw[start..])
    } else {
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while raw.len() < start + len {
            if !read_more(&mut raw)? {
                return Err("connection closed inside the body".into());
            }
        }
        raw[start..start + len].to_vec()
    };
    if payload.is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&payload).map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&payload)))?;
    Ok((status, v))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = &data[(end + 2).min(data.len())..];
    }
    out
}

/// Fails with the install advice unless the browser pieces are present.
pub fn require_browser() {
    let _ = chromedriver_path();
    let chromium = chromium_path();
    assert!(Path::new(&chromium).is_file(), "{} is not a file: {INSTALL_HINT}", chromium.display());
}
