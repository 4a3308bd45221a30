//! The `helpline` binary as a user runs it.

use std::io::Write;
use std::process::{Output, Stdio};

use crate::support::{self, helpline_bin};

fn run(args: &[&str]) -> Output {
    helpline_bin().args(args).output().expect("binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[derive(serde::Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn tokenize_prints_the_reference_ids_for_both_models() {
    for (name, model) in [("smollm2-public", None), ("gemma3-public", Some(support::gemma3_path()))] {
        let lines = std::fs::read_to_string(support::root().join(format!("tests/reference/{name}.tokenize.jsonl"))).unwrap();
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            let case: TokCase = serde_json::from_str(line).unwrap();
            let mut cmd = helpline_bin();
            if let Some(m) = &model {
                cmd.arg("--model").arg(m);
            }
            let out = cmd.arg("tokenize").arg(&case.text).output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            let ids: Vec<u32> = serde_json::from_str(stdout(&out).trim()).unwrap();
            assert_eq!(ids, case.ids, "{name}: {:?}", case.text);
        }
    }
}

#[test]
fn tokenize_special_flag_parses_special_tokens() {
    let plain: Vec<u32> = serde_json::from_str(stdout(&run(&["tokenize", "<|im_start|>user"])).trim()).unwrap();
    let special: Vec<u32> = serde_json::from_str(stdout(&run(&["tokenize", "--special", "<|im_start|>user"])).trim()).unwrap();
    assert_eq!(special[0], 1);
    assert!(plain.len() > special.len() && !plain.contains(&1));
}

#[test]
fn ask_streams_the_greedy_answer() {
    // The bare model (grounded answers are covered in answers.rs).
    let out = run(&["ask", "--no-grounding", "Hi!"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Hello! How can I assist you today?\n");
}

#[test]
fn chat_keeps_history_and_resets() {
    let mut child = helpline_bin()
        .args(["chat", "--no-grounding", "--max-tokens", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hi!\nWhat did I just say?\n/reset\nHi!\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let answers: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(answers.len() >= 3, "{text}");
    assert_eq!(answers[0], "Hello! How can I assist you today?");
    assert!(text.matches("Hello! How can I assist you today?").count() >= 2, "after /reset the same greeting comes back: {text}");
    assert!(stderr(&out).contains("history cleared"));
}

#[test]
fn bench_json_reports_pp_and_tg() {
    let out = run(&["bench", "-p", "32", "-n", "8", "-r", "2", "-t", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["test"], "pp32");
    assert_eq!(rows[1]["test"], "tg8");
    for r in &rows {
        assert_eq!(r["threads"], 2);
        assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(r["samples"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn models_list_shows_both_models() {
    let out = run(&["models", "list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("smollm2-135m") && text.contains("gemma3-270m") && text.contains("present"), "{text}");
}

#[test]
fn bad_inputs_get_messages_that_say_what_to_change() {
    let out = run(&["--model", "/nonexistent/model.gguf", "ask", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/model.gguf"), "{}", stderr(&out));

    let out = run(&["ask", "--top-p", "1.5", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("`top_p` must be in (0, 1]"), "{}", stderr(&out));

    let out = run(&["--threads", "0", "ask", "hi"]);
    assert!(stderr(&out).contains("--threads must be at least 1"), "{}", stderr(&out));

    let out = run(&["models", "pull", "no-such-model"]);
    assert!(stderr(&out).contains("unknown model `no-such-model`") && stderr(&out).contains("smollm2-135m"), "{}", stderr(&out));
}

#[test]
fn hub_model_offline_says_how_to_get_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let out = helpline_bin()
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", cache.path())
        .env_remove("HF_HUB_CACHE")
        .args(["--model", "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf", "ask", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out).to_lowercase();
    assert!(err.contains("offline"), "{err}");
    assert!(err.contains("--model"), "advice on copying the file over is missing: {err}");
}
