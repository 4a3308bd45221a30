//! Building the index from a docs directory: incremental and atomic.
//!
//! - **Incremental**: a manifest (relative path -> sha256 of the bytes, doc id, status, chunk count)
//!   travels in the tantivy commit payload. A re-run re-chunks only files whose bytes changed,
//!   deletes the chunks of changed, removed or newly broken files by doc-id term, and does not
//!   commit at all when the manifest would be unchanged.
//! - **Atomic**: every change of one run goes into one tantivy commit, with the manifest as its
//!   payload, so a reader sees the old state or the new one, never a mix; the manifest can never
//!   disagree with the data.
//! - **Schema changes**: the payload records [`SCHEMA_VERSION`]; a mismatch deletes every document
//!   and re-indexes everything in that same single commit.
//! - **Draft and retired articles are not indexed** (reported as `Excluded`): nothing may ever
//!   serve them, and keeping them out also keeps their words out of the BM25 statistics. The search
//!   side still requires `status == approved` on every query as a second line of defence.
//! - `README.*` files without front matter and hidden files (`.name`) are ignored silently: they
//!   describe the corpus and are not articles. So are `*.toml` files: configuration that lives beside
//!   the docs it governs (the policy pack, `policy.toml`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tantivy::directory::error::LockError;
use tantivy::schema::Term;
use tantivy::{doc, Index, IndexWriter, TantivyDocument, TantivyError};

use super::chunk::chunk_blocks;
use super::evidence::{self, Draft, EvidenceTable, Unit, UnitKind};
use super::document::{self, Article, DocStatus, Format, ParseError};
use super::schema::{self, Fields, KIND_CHUNK, KIND_META, SCHEMA_VERSION};
use super::RetrievalError;

/// Memory for tantivy's indexing threads. Enough for a corpus 100x the default one in one segment
/// per thread; tantivy splits the work into more segments beyond that.
const WRITER_MEMORY: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct IndexOptions {
    pub docs_dir: PathBuf,
    pub index_dir: PathBuf,
    /// Embeds every evidence unit (sentences, list items, table rows) for dense retrieval and
    /// evidence selection.
    pub embedder: std::sync::Arc<crate::embed::Embedder>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexReport {
    /// Every file looked at, in path order (ignored READMEs and hidden files are not listed),
    /// followed by files removed since the previous build.
    pub files: Vec<FileOutcome>,
    /// Approved chunks now in the index.
    pub chunks: usize,
    /// Approved documents now in the index.
    pub documents: usize,
    /// Version of the indexed content after this run (see [`KnowledgeBase::version`](super::KnowledgeBase::version)).
    pub version: String,
    pub bytes_read: u64,
    pub elapsed_ms: f64,
    /// Whether this run wrote a commit (false when nothing changed).
    pub committed: bool,
    /// Evidence units (sentences, list items, table rows) of the approved articles.
    pub units: usize,
    /// Vectors this run computed with the model (two per unit; the others came from the previous
    /// build or the embedding cache).
    pub embedded: usize,
    /// Time spent embedding them.
    pub embed_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileOutcome {
    /// Path relative to the docs directory, `/`-separated.
    pub path: String,
    pub doc_id: Option<String>,
    #[serde(flatten)]
    pub status: FileStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FileStatus {
    /// New or changed since the last build, (re-)indexed with this many chunks.
    Indexed { chunks: usize },
    Unchanged,
    /// The file is gone; its chunks were deleted.
    Removed,
    /// A draft or retired article: never indexed.
    Excluded { doc_status: String },
    /// Not indexed because of a problem with this file; the reason says what to change.
    Skipped { reason: String },
}

impl IndexReport {
    fn count(&self, pred: impl Fn(&FileStatus) -> bool) -> usize {
        self.files.iter().filter(|f| pred(&f.status)).count()
    }
    pub fn indexed(&self) -> usize {
        self.count(|s| matches!(s, FileStatus::Indexed { .. }))
    }
    pub fn unchanged(&self) -> usize {
        self.count(|s| matches!(s, FileStatus::Unchanged))
    }
    pub fn removed(&self) -> usize {
        self.count(|s| matches!(s, FileStatus::Removed))
    }
    pub fn excluded(&self) -> usize {
        self.count(|s| matches!(s, FileStatus::Excluded { .. }))
    }
    pub fn skipped(&self) -> usize {
        self.count(|s| matches!(s, FileStatus::Skipped { .. }))
    }
}

impl fmt::Display for IndexReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} indexed, {} unchanged, {} removed, {} excluded (draft/retired), {} skipped",
            self.indexed(),
            self.unchanged(),
            self.removed(),
            self.excluded(),
            self.skipped()
        )?;
        writeln!(
            f,
            "index: {} documents, {} chunks, {} evidence units, version {} ({}; {:.1} KiB read in {:.0} ms; {} vectors computed, {:.0} ms)",
            self.documents,
            self.chunks,
            self.units,
            self.version,
            if self.committed { "committed" } else { "nothing changed, no commit" },
            self.bytes_read as f64 / 1024.0,
            self.elapsed_ms,
            self.embedded,
            self.embed_ms
        )?;
        for file in &self.files {
            if let FileStatus::Skipped { reason } = &file.status {
                writeln!(f, "skipped {}: {reason}", file.path)?;
            }
        }
        Ok(())
    }
}

/// What the commit payload records about one file that was accepted as an article.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestEntry {
    sha256: String,
    doc_id: String,
    /// `approved`, `draft` or `retired`; only approved entries have chunks in the index.
    status: String,
    chunks: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    schema: String,
    files: BTreeMap<String, ManifestEntry>,
}

impl Manifest {
    fn empty() -> Manifest {
        Manifest { schema: SCHEMA_VERSION.to_string(), files: BTreeMap::new() }
    }

    /// Content version: a hash of the schema version and every entry, so it is the same for the
    /// same corpus whoever builds it, and changes whenever any indexed or excluded file changes.
    fn version(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.schema.as_bytes());
        for (path, e) in &self.files {
            for part in [path.as_str(), &e.sha256, &e.doc_id, &e.status] {
                h.update(part.as_bytes());
                h.update([0]);
            }
        }
        hex(&h.finalize()[..8])
    }

    fn approved(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.files.values().filter(|e| e.status == DocStatus::Approved.as_str())
    }
}

/// Bookkeeping stored in the index itself (one document of kind `meta`), so that a reader learns
/// the version and counts of exactly the commit its searcher sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexMeta {
    pub version: String,
    pub chunks: usize,
    pub documents: usize,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tantivy_err(e: TantivyError) -> RetrievalError {
    RetrievalError::Tantivy(e.to_string())
}

/// Reads the docs directory and brings the index at `index_dir` up to date in one commit.
pub fn build_index(opts: &IndexOptions) -> Result<IndexReport, RetrievalError> {
    let start = Instant::now();
    let mut listing = Listing::default();
    list_files(&opts.docs_dir, &opts.docs_dir, &mut listing)?;
    listing.files.sort();

    let index = open_or_create(&opts.index_dir)?;
    let fields = Fields::resolve(&index.schema()).map_err(tantivy_err)?;
    let mut writer: IndexWriter<TantivyDocument> = index.writer(WRITER_MEMORY).map_err(|e| match e {
        TantivyError::LockFailure(LockError::LockBusy, _) => RetrievalError::Locked { path: opts.index_dir.clone() },
        other => tantivy_err(other),
    })?;
    // Read the manifest only once the lock is held: no other writer can commit under us now.
    let payload = index.load_metas().map_err(tantivy_err)?.payload;
    let previous: Option<Manifest> = payload.and_then(|p| serde_json::from_str(&p).ok());
    let full_rebuild = previous.as_ref().is_none_or(|m| m.schema != SCHEMA_VERSION);
    let old = if full_rebuild { Manifest::empty() } else { previous.clone().unwrap_or_else(Manifest::empty) };

    let mut bytes_read = 0u64;
    let mut outcomes: Vec<FileOutcome> = listing.problems;
    let mut new = Manifest::empty();
    let mut to_add: Vec<(String, Article, usize)> = Vec::new(); // (path, article, outcome index)
    // Every approved article (changed or not): evidence units are derived from all of them.
    let mut approved: Vec<(String, Article, usize)> = Vec::new();
    let mut id_owner: HashMap<String, String> = HashMap::new();

    for (rel, abs) in &listing.files {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let lower = name.to_ascii_lowercase();
        let is_readme = lower.starts_with("readme.");
        // READMEs describe the corpus; TOML files beside the docs are configuration (the policy pack).
        let by_design = is_readme || lower.ends_with(".toml");
        let Some(format) = Format::from_path(rel) else {
            if !by_design {
                outcomes.push(skipped(rel, None, "unsupported file type (expected .md, .txt, .html or .htm)".into()));
            }
            continue;
        };
        let bytes = match std::fs::read(abs) {
            Ok(b) => b,
            Err(e) => {
                outcomes.push(skipped(rel, None, format!("cannot read: {e}")));
                continue;
            }
        };
        bytes_read += bytes.len() as u64;
        let article = match document::parse(&bytes, format) {
            Ok(a) => a,
            Err(ParseError::NoFrontMatter) if is_readme => continue,
            Err(e) => {
                outcomes.push(skipped(rel, None, e.to_string()));
                continue;
            }
        };
        let id = article.meta.id.clone();
        // Ids are unique across the corpus; the first file in path order keeps the id and later
        // ones are skipped, naming it, so an accidental copy cannot take an article offline.
        if let Some(first) = id_owner.get(&id) {
            outcomes.push(skipped(rel, Some(id.clone()), format!("duplicate id `{id}`: already used by {first}")));
            continue;
        }
        id_owner.insert(id.clone(), rel.clone());
        let sha = hex(&Sha256::digest(&bytes));
        let status = article.meta.status;
        if status != DocStatus::Approved {
            new.files.insert(rel.clone(), ManifestEntry { sha256: sha, doc_id: id.clone(), status: status.as_str().into(), chunks: 0 });
            outcomes.push(FileOutcome { path: rel.clone(), doc_id: Some(id), status: FileStatus::Excluded { doc_status: status.as_str().into() } });
            continue;
        }
        let drafts = article_units(&article);
        if drafts.is_empty() {
            outcomes.push(skipped(
                rel,
                Some(id.clone()),
                "has no sentence, list item or table row to quote (only front matter or headings): add the article's text".into(),
            ));
            continue;
        }
        approved.push((rel.clone(), article.clone(), outcomes.len()));
        let unchanged = old.files.get(rel).filter(|e| e.sha256 == sha && e.doc_id == id && e.status == status.as_str());
        if let Some(entry) = unchanged {
            new.files.insert(rel.clone(), entry.clone());
            outcomes.push(FileOutcome { path: rel.clone(), doc_id: Some(id), status: FileStatus::Unchanged });
            continue;
        }
        new.files.insert(rel.clone(), ManifestEntry { sha256: sha, doc_id: id.clone(), status: status.as_str().into(), chunks: 0 });
        outcomes.push(FileOutcome { path: rel.clone(), doc_id: Some(id), status: FileStatus::Indexed { chunks: 0 } });
        to_add.push((rel.clone(), article, outcomes.len() - 1));
    }

    // Files that were indexed and now are gone (or broken, or no longer approved) lose their chunks.
    let present: HashSet<&str> = listing.files.iter().map(|(rel, _)| rel.as_str()).collect();
    let mut delete_ids: HashSet<String> = HashSet::new();
    for (path, entry) in &old.files {
        if new.files.get(path) != Some(entry) && entry.chunks > 0 {
            delete_ids.insert(entry.doc_id.clone());
        }
        if !present.contains(path.as_str()) {
            outcomes.push(FileOutcome { path: path.clone(), doc_id: Some(entry.doc_id.clone()), status: FileStatus::Removed });
        } else if !new.files.contains_key(path) && entry.chunks > 0 {
            // Still on disk but skipped now: say that the old version is no longer served.
            if let Some(o) = outcomes.iter_mut().find(|o| &o.path == path) {
                if let FileStatus::Skipped { reason } = &mut o.status {
                    reason.push_str(" (the previously indexed version was removed from the index)");
                }
            }
        }
    }
    // A doc id whose chunks are deleted must be re-added if an unchanged file still owns it
    // (an id that moved from one file to another).
    for (rel, entry) in new.files.iter().filter(|(_, e)| e.status == DocStatus::Approved.as_str()) {
        if delete_ids.contains(&entry.doc_id) && !to_add.iter().any(|(p, _, _)| p == rel) {
            let abs = opts.docs_dir.join(rel);
            let article = std::fs::read(&abs).ok().and_then(|b| document::parse(&b, Format::from_path(rel)?).ok());
            if let (Some(article), Some(i)) = (article, outcomes.iter().position(|o| &o.path == rel)) {
                outcomes[i].status = FileStatus::Indexed { chunks: 0 };
                to_add.push((rel.clone(), article, i));
            }
        }
    }
    for (_, article, _) in &to_add {
        delete_ids.insert(article.meta.id.clone());
    }

    // Chunk the new and changed articles (deletes first: tantivy applies a delete only to documents
    // added before it).
    if full_rebuild {
        // Before any other operation: it resets the writer's operation stamps.
        writer.delete_all_documents().map_err(tantivy_err)?;
    } else {
        for id in &delete_ids {
            writer.delete_term(Term::from_field_text(fields.doc_id, id));
        }
    }
    for (rel, article, outcome) in &to_add {
        let chunks = chunk_blocks(&article.meta.title, &article.blocks);
        let m = &article.meta;
        for (ordinal, chunk) in chunks.iter().enumerate() {
            writer
                .add_document(doc!(
                    fields.kind => KIND_CHUNK,
                    fields.chunk_id => format!("{}#{ordinal}", m.id),
                    fields.doc_id => m.id.as_str(),
                    fields.ordinal => ordinal as u64,
                    fields.title => m.title.as_str(),
                    fields.section => chunk.section.as_str(),
                    fields.text => chunk.text.as_str(),
                    fields.source => rel.as_str(),
                    fields.status => m.status.as_str(),
                    fields.updated => m.updated.as_str(),
                    fields.product_area => m.product_area.to_lowercase(),
                    fields.locale => m.locale.as_str(),
                ))
                .map_err(tantivy_err)?;
        }
        if let Some(entry) = new.files.get_mut(rel) {
            entry.chunks = chunks.len();
        }
        outcomes[*outcome].status = FileStatus::Indexed { chunks: chunks.len() };
    }

    // Evidence: the units of every approved article, each with its vector. Vectors of texts the
    // previous build already embedded are reused; only new sentences go through the model.
    let evidence_started = Instant::now();
    let previous_evidence = previous
        .as_ref()
        .filter(|_| !full_rebuild)
        .map(|m| evidence::file_for(&opts.index_dir, &m.version(), opts.embedder.fingerprint()))
        .and_then(|p| EvidenceTable::read(&p).ok());
    let reuse = previous_evidence.as_ref().map(|t| t.vectors_by_text()).unwrap_or_default();
    let mut units: Vec<Unit> = Vec::new();
    approved.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, article, _) in &approved {
        let m = &article.meta;
        for (position, (ordinal, d)) in article_units(article).into_iter().enumerate() {
            units.push(Unit {
                chunk_id: format!("{}#{ordinal}", m.id),
                doc_id: m.id.clone(),
                title: m.title.clone(),
                product_area: m.product_area.to_lowercase(),
                locale: m.locale.clone(),
                section: d.section,
                position: position as u32,
                block: d.block,
                kind: d.kind,
                text: d.text,
            });
        }
    }
    let dim = opts.embedder.dim();
    // Two vectors per unit: read in its article's context, and its text alone.
    let inputs: Vec<String> = units.iter().map(Unit::embedded_text).chain(units.iter().map(|u| u.text.clone())).collect();
    let mut all = vec![0f32; inputs.len() * dim];
    let mut missing: Vec<usize> = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        match reuse.get(&evidence::text_key(t)) {
            Some(v) if v.len() == dim => all[i * dim..(i + 1) * dim].copy_from_slice(v),
            _ => missing.push(i),
        }
    }
    drop(reuse);
    drop(previous_evidence);
    let texts: Vec<&str> = missing.iter().map(|&i| inputs[i].as_str()).collect();
    let computed_before = opts.embedder.computed();
    let embedded = opts.embedder.embed(&texts)?;
    let computed = opts.embedder.computed() - computed_before;
    for (&i, v) in missing.iter().zip(embedded) {
        all[i * dim..(i + 1) * dim].copy_from_slice(&v);
    }
    let plain = all.split_off(units.len() * dim);
    let vectors = all;
    let embed_ms = evidence_started.elapsed().as_secs_f64() * 1e3;
    let unit_count = units.len();
    let table = EvidenceTable::new(units, vectors, plain, dim, opts.embedder.fingerprint().to_string());
    let evidence_path = evidence::file_for(&opts.index_dir, &new.version(), opts.embedder.fingerprint());
    let evidence_missing = !evidence_path.exists();

    let meta = IndexMeta {
        version: new.version(),
        chunks: new.approved().map(|e| e.chunks).sum(),
        documents: new.approved().filter(|e| e.chunks > 0).count(),
    };
    let committed = full_rebuild || previous.as_ref() != Some(&new);
    if committed || evidence_missing || !missing.is_empty() {
        // Before the commit that makes this version visible.
        table.write(&evidence_path)?;
    }
    if committed {
        writer.delete_term(Term::from_field_text(fields.kind, KIND_META));
        let meta_json = serde_json::to_string(&meta).map_err(|e| RetrievalError::Tantivy(e.to_string()))?;
        writer.add_document(doc!(fields.kind => KIND_META, fields.meta => meta_json)).map_err(tantivy_err)?;
        let payload = serde_json::to_string(&new).map_err(|e| RetrievalError::Tantivy(e.to_string()))?;
        let mut prepared = writer.prepare_commit().map_err(tantivy_err)?;
        prepared.set_payload(&payload);
        prepared.commit().map_err(tantivy_err)?;
        // Merging threads finish in the background otherwise; waiting keeps the directory tidy
        // and releases the lock only when everything is on disk.
        writer.wait_merging_threads().map_err(tantivy_err)?;
    }
    evidence::remove_others(&opts.index_dir, &evidence_path);
    Ok(IndexReport {
        files: outcomes,
        chunks: meta.chunks,
        documents: meta.documents,
        version: meta.version,
        bytes_read,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        committed,
        units: unit_count,
        embedded: computed,
        embed_ms,
    })
}

/// An article's evidence units with the ordinal of the chunk each belongs to, in reading order.
/// Block numbers are made unique within the article.
fn article_units(article: &Article) -> Vec<(usize, Draft)> {
    let headings = heading_paths(&article.meta.title, &article.blocks);
    let mut out = Vec::new();
    let mut block_base = 0u32;
    for (ordinal, chunk) in chunk_blocks(&article.meta.title, &article.blocks).iter().enumerate() {
        let drafts = evidence::split_chunk(&chunk.text, &chunk.section, &headings);
        let blocks = drafts.iter().map(|d| d.block + 1).max().unwrap_or(0);
        // A list the chunker split between two chunks stays one block: it is quoted as one list.
        let continues = matches!(
            (out.last().map(|(_, d): &(usize, Draft)| d), drafts.first()),
            (Some(prev), Some(first)) if matches!(prev.kind, UnitKind::Item { .. }) && matches!(first.kind, UnitKind::Item { .. }) && first.block == 0 && prev.section == first.section
        );
        let base = if continues { block_base - 1 } else { block_base };
        for mut d in drafts {
            d.block += base;
            out.push((ordinal, d));
        }
        block_base = base + blocks;
    }
    out
}

/// Each heading's text with the section path it opens (as the chunker names sections).
fn heading_paths(title: &str, blocks: &[document::Block]) -> Vec<(String, String)> {
    let mut stack: Vec<(u8, String)> = Vec::new();
    let mut out = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        if let document::Block::Heading { level, text } = b {
            if *level == 1 && i == 0 && text.trim().eq_ignore_ascii_case(title.trim()) {
                continue;
            }
            if *level > 3 {
                continue;
            }
            stack.retain(|(l, _)| l < level);
            stack.push((*level, text.clone()));
            out.push((text.clone(), stack.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(" > ")));
        }
    }
    out
}

fn skipped(path: &str, doc_id: Option<String>, reason: String) -> FileOutcome {
    FileOutcome { path: path.to_string(), doc_id, status: FileStatus::Skipped { reason } }
}

#[derive(Default)]
struct Listing {
    /// (relative `/`-separated path, absolute path)
    files: Vec<(String, PathBuf)>,
    /// Sub-directories that could not be read.
    problems: Vec<FileOutcome>,
}

/// Collects the regular files under `dir`, skipping hidden entries. Only an unreadable root is
/// fatal; an unreadable sub-directory becomes a skipped entry.
fn list_files(root: &Path, dir: &Path, out: &mut Listing) -> Result<(), RetrievalError> {
    let rel_of = |p: &Path| p.strip_prefix(root).unwrap_or(p).components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if dir == root => return Err(RetrievalError::DocsDir { path: root.to_path_buf(), reason: e.to_string() }),
        Err(e) => {
            out.problems.push(skipped(&rel_of(dir), None, format!("cannot read directory: {e}")));
            return Ok(());
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.problems.push(skipped(&rel_of(dir), None, format!("cannot read directory: {e}")));
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks to files; symlinked directories are not followed (no cycles).
        let is_symlink = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() && !is_symlink => list_files(root, &path, out)?,
            Ok(m) if m.is_file() => out.files.push((rel_of(&path), path)),
            Ok(_) => {}
            Err(e) => out.problems.push(skipped(&rel_of(&path), None, format!("cannot read: {e}"))),
        }
    }
    Ok(())
}

/// Opens the index at `dir`, creating it when absent. An index with another tantivy schema is
/// deleted and created anew (its readers keep their open files until they reopen).
fn open_or_create(dir: &Path) -> Result<Index, RetrievalError> {
    std::fs::create_dir_all(dir)?;
    let want = schema::schema();
    let index = if dir.join("meta.json").exists() {
        let index = Index::open_in_dir(dir).map_err(tantivy_err)?;
        if index.schema() == want {
            index
        } else {
            drop(index);
            remove_tantivy_files(dir)?;
            Index::create_in_dir(dir, want).map_err(tantivy_err)?
        }
    } else {
        Index::create_in_dir(dir, want).map_err(tantivy_err)?
    };
    schema::register_analyzer(&index);
    Ok(index)
}

/// Deletes the files tantivy manages in `dir` (listed in `.managed.json`) and its meta files,
/// leaving anything else (such as a README) alone.
fn remove_tantivy_files(dir: &Path) -> Result<(), RetrievalError> {
    let managed: Vec<String> = std::fs::read(dir.join(".managed.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for name in managed.iter().map(String::as_str).chain(["meta.json", ".managed.json"]) {
        if name.contains('/') || name.contains("..") {
            continue;
        }
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
