//! Downloads from the Hugging Face Hub with the `hf-hub` crate into the standard cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so checkpoints already pulled by
//! mlx-lm or `huggingface-cli` are found and reused, and ours are theirs.
//!
//! A pull first asks the Hub for the file list with sizes and hashes (`/api/models/{repo}/revision/{rev}
//! ?blobs=true`), skips files already in the cache at the right size, downloads the rest (hf-hub resumes an
//! interrupted file from its `.sync.part` at chunk granularity), then verifies each new file: size, and the
//! LFS SHA-256 or the git blob SHA-1. A file that fails verification is deleted so the next pull fetches it
//! again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::{Deserialize, Serialize};
use sha1::Digest as _;

use crate::catalog::{Entry, Format};
use crate::{ModelsError, Result};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to download.
#[derive(Debug, Clone, Default)]
pub struct HubConfig {
    /// Hub base URL (None: `$HF_ENDPOINT`, else huggingface.co).
    pub endpoint: Option<String>,
    /// Access token for gated/private repos.
    pub token: Option<String>,
    /// Hub cache directory (None: the standard one, see [`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Resume granularity in bytes (None: hf-hub's 10 MB).
    pub chunk_size: Option<usize>,
}

/// The standard Hugging Face hub cache directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return p.into();
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        return Path::new(&h).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/huggingface/hub")
}

/// The token the HF CLI stored (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`).
pub fn cli_token() -> Option<String> {
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| Path::new(&h).join("token")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/token"))
        })?;
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// One file to fetch, as the Hub describes it.
#[derive(Debug, Clone, Serialize)]
pub struct FileSpec {
    /// Path in the repo.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content (LFS files).
    pub sha256: Option<String>,
    /// Git blob id (SHA-1 of `blob <len>\0<content>`), for files stored in git.
    pub blob_id: Option<String>,
}

/// What a pull will fetch.
#[derive(Debug, Clone, Serialize)]
pub struct PullPlan {
    /// Repo id.
    pub repo: String,
    /// Requested revision.
    pub revision: String,
    /// Commit the revision resolves to.
    pub commit: Option<String>,
    /// Files.
    pub files: Vec<FileSpec>,
}

impl PullPlan {
    /// Bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

pub use crate::PullProgress;

/// Which files of a repo a model needs.
#[derive(Debug, Clone)]
pub enum Selection {
    /// An MLX/HF model directory: configs, tokenizer, chat template, safetensors weights.
    Mlx,
    /// One file.
    File(String),
}

impl Selection {
    /// The selection of a catalog entry.
    pub fn of(e: &Entry) -> Self {
        match (e.format, &e.file) {
            (Format::Gguf, Some(f)) => Selection::File(f.clone()),
            _ => Selection::Mlx,
        }
    }

    fn wants(&self, name: &str) -> bool {
        match self {
            Selection::File(f) => name == f,
            // mlx-lm's allow_patterns, minus Python code (never executed here).
            Selection::Mlx => {
                !name.contains('/')
                    && (name.ends_with(".json")
                        || name.ends_with(".safetensors")
                        || name.ends_with(".jinja")
                        || name.ends_with(".txt")
                        || name == "tokenizer.model"
                        || name.ends_with(".tiktoken"))
            }
        }
    }
}

#[derive(Deserialize)]
struct ApiInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: String,
    size: u64,
}

/// A Hub client.
pub struct Hub {
    api: Api,
    cache: Cache,
    endpoint: String,
}

#[derive(Clone)]
struct Counter {
    done: Arc<AtomicU64>,
    total: u64,
    file: Arc<str>,
    sink: Arc<dyn Fn(PullProgress) + Send + Sync>,
}

impl Counter {
    fn report(&self) {
        (self.sink)(PullProgress {
            file: self.file.to_string(),
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: self.total,
        });
    }
}

impl hf_hub::api::tokio::Progress for Counter {
    async fn init(&mut self, _size: usize, _filename: &str) {
        self.report();
    }
    async fn update(&mut self, size: usize) {
        self.done.fetch_add(size as u64, Ordering::Relaxed);
        self.report();
    }
    async fn finish(&mut self) {
        self.report();
    }
}

fn map_api_error(repo: &str, endpoint: &str, e: ApiError) -> ModelsError {
    if let ApiError::RequestError(re) = &e
        && let Some(s) = re.status()
    {
        let status = s.as_u16();
        if status == 401 || status == 403 {
            return ModelsError::Denied {
                repo: repo.into(),
                status,
                url: format!("{endpoint}/{repo}"),
            };
        }
        if status == 404 {
            return ModelsError::NotFound(repo.into());
        }
    }
    ModelsError::Download(e.to_string())
}

impl Hub {
    /// A client for `cfg`.
    pub fn new(cfg: HubConfig) -> Result<Self> {
        let endpoint = cfg
            .endpoint
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim_end_matches('/')
            .to_string();
        let cache_dir = cfg.cache_dir.unwrap_or_else(default_cache_dir);
        let api = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
            .with_endpoint(endpoint.clone())
            .with_token(cfg.token)
            .with_progress(false)
            .with_chunk_size(Some(cfg.chunk_size.unwrap_or(10_000_000)))
            .with_user_agent("jemma", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| ModelsError::Download(e.to_string()))?;
        Ok(Self {
            api,
            cache: Cache::new(cache_dir),
            endpoint,
        })
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        self.cache.path()
    }

    /// The Hub repo (`owner/name`) whose cached snapshot holds `path`, when `path` lies in this cache
    /// (hf-hub's layout: `<cache>/models--<owner>--<name>/snapshots/<commit>/…`).
    pub fn repo_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(self.cache_dir()).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        let (owner, name) = first.strip_prefix("models--")?.split_once("--")?;
        Some(format!("{owner}/{name}"))
    }

    /// The model repos (`owner/name`) this cache holds something of, sorted.
    pub fn cached_repos(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.cache_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.to_string();
                let (owner, name) = n.strip_prefix("models--")?.split_once("--")?;
                Some(format!("{owner}/{name}"))
            })
            .collect();
        out.sort();
        out
    }

    fn repo(repo: &str, revision: &str) -> Repo {
        Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
    }

    /// Asks the Hub which files `selection` needs, with sizes and hashes.
    pub async fn plan(
        &self,
        repo: &str,
        revision: &str,
        selection: &Selection,
    ) -> Result<PullPlan> {
        let resp = self
            .api
            .repo(Self::repo(repo, revision))
            .info_request()
            .query(&[("blobs", "true")])
            .send()
            .await
            .map_err(|e| ModelsError::Download(format!("{}: {e}", self.endpoint)))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(ModelsError::Denied {
                repo: repo.into(),
                status,
                url: format!("{}/{repo}", self.endpoint),
            });
        }
        if status == 404 {
            return Err(ModelsError::NotFound(format!("{repo}@{revision}")));
        }
        let text = resp
            .text()
            .await
            .map_err(|e| ModelsError::Download(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(ModelsError::Download(format!(
                "{repo}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        let info: ApiInfo = serde_json::from_str(&text)
            .map_err(|e| ModelsError::Download(format!("{repo}: unexpected Hub answer: {e}")))?;
        let files: Vec<FileSpec> = info
            .siblings
            .into_iter()
            .filter(|s| selection.wants(&s.rfilename))
            .map(|s| FileSpec {
                size: s.lfs.as_ref().map(|l| l.size).or(s.size).unwrap_or(0),
                sha256: s.lfs.map(|l| l.sha256),
                blob_id: s.blob_id,
                name: s.rfilename,
            })
            .collect();
        if files.is_empty() {
            return Err(ModelsError::NotFound(match selection {
                Selection::File(f) => format!("{repo}/{f}"),
                Selection::Mlx => format!("{repo}: no model files"),
            }));
        }
        if matches!(selection, Selection::Mlx) && !files.iter().any(|f| f.name == "config.json") {
            return Err(ModelsError::NotFound(format!(
                "{repo}: no config.json (not an MLX/HF model repo)"
            )));
        }
        Ok(PullPlan {
            repo: repo.into(),
            revision: revision.into(),
            commit: info.sha,
            files,
        })
    }

    /// The snapshot directory of `repo@revision` if the cache already holds the files of `selection`
    /// (found without the network; `files` None = whatever is there, requiring config.json for MLX).
    pub fn cached(&self, repo: &str, revision: &str, selection: &Selection) -> Option<PathBuf> {
        let cr = self.cache.repo(Self::repo(repo, revision));
        let probe = match selection {
            Selection::File(f) => f.as_str(),
            Selection::Mlx => "config.json",
        };
        let path = cr.get(probe)?;
        match selection {
            Selection::File(_) => Some(path),
            Selection::Mlx => {
                let dir = path.parent()?.to_path_buf();
                // Weights present too (a pull interrupted after config.json is not a model yet).
                let has_weights = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
                    e.file_name().to_string_lossy().ends_with(".safetensors") && e.path().exists()
                });
                has_weights.then_some(dir)
            }
        }
    }

    /// Fetches what `plan` lists that the cache lacks, verifies it, and returns the snapshot path (the
    /// directory for MLX, the file for a single-file selection).
    pub async fn pull(
        &self,
        plan: &PullPlan,
        on_progress: Arc<dyn Fn(PullProgress) + Send + Sync>,
    ) -> Result<PathBuf> {
        let rev = plan.commit.clone().unwrap_or_else(|| plan.revision.clone());
        let api_repo = self.api.repo(Self::repo(&plan.repo, &rev));
        let cache_repo = self.cache.repo(Self::repo(&plan.repo, &rev));
        let done = Arc::new(AtomicU64::new(0));
        let total = plan.total_bytes();
        let mut last = None;
        for f in &plan.files {
            let counter = Counter {
                done: done.clone(),
                total,
                file: Arc::from(f.name.as_str()),
                sink: on_progress.clone(),
            };
            if let Some(p) = cache_repo.get(&f.name)
                && file_len(&p) == Some(f.size)
            {
                done.fetch_add(f.size, Ordering::Relaxed);
                counter.report();
                last = Some(p);
                continue;
            }
            let before = done.load(Ordering::Relaxed);
            let path = api_repo
                .download_with_progress(&f.name, counter.clone())
                .await
                .map_err(|e| map_api_error(&plan.repo, &self.endpoint, e))?;
            // hf-hub counts resumed bytes again; keep the overall figure exact.
            done.store(before + f.size, Ordering::Relaxed);
            counter.report();
            let checked = path.clone();
            let spec = f.clone();
            let verdict = tokio::task::spawn_blocking(move || verify(&checked, &spec))
                .await
                .map_err(|e| ModelsError::Download(e.to_string()))?;
            if let Err(e) = verdict {
                // Remove the link and its blob so that the next pull downloads the file again.
                if let Ok(blob) = std::fs::canonicalize(&path) {
                    let _ = std::fs::remove_file(blob);
                }
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            last = Some(path);
        }
        // hf-hub records refs/<commit>; also point the requested branch at it, as huggingface_hub does.
        if let Some(commit) = &plan.commit
            && commit != &plan.revision
        {
            let refs = self
                .cache
                .path()
                .join(Repo::model(plan.repo.clone()).folder_name())
                .join("refs");
            let _ = std::fs::create_dir_all(&refs);
            let _ = std::fs::write(refs.join(&plan.revision), commit);
        }
        let last = last.ok_or_else(|| ModelsError::NotFound(plan.repo.clone()))?;
        Ok(
            if plan.files.len() == 1 && !plan.files[0].name.ends_with(".json") {
                last
            } else {
                last.parent().map(Path::to_path_buf).unwrap_or(last)
            },
        )
    }
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// Checks a downloaded file against the Hub's size and hash.
pub fn verify(path: &Path, spec: &FileSpec) -> Result<()> {
    let fail = |why: String| ModelsError::Verify {
        file: spec.name.clone(),
        why,
    };
    let len = file_len(path).ok_or_else(|| fail("missing after download".into()))?;
    if len != spec.size {
        return Err(fail(format!("{len} bytes, the Hub says {}", spec.size)));
    }
    let mut f = std::fs::File::open(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> Result<()> {
        loop {
            let n = f.read(&mut buf).map_err(|source| ModelsError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if n == 0 {
                return Ok(());
            }
            update(&buf[..n]);
        }
    };
    if let Some(want) = &spec.sha256 {
        let mut h = sha2::Sha256::new();
        feed(&mut |b| h.update(b))?;
        let got = hex::encode(h.finalize());
        if !got.eq_ignore_ascii_case(want) {
            return Err(fail(format!("sha256 {got}, the Hub says {want}")));
        }
    } else if let Some(want) = &spec.blob_id {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {len}\0").as_bytes());
        feed(&mut |b| h.update(b))?;
        let got = hex::encode(h.finalize());
        if !got.eq_ignore_ascii_case(want) {
            return Err(fail(format!("git blob id {got}, the Hub says {want}")));
        }
    }
    Ok(())
}

/// What a model reference in a config or on the command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A local directory or file.
    Path(PathBuf),
    /// A catalog entry.
    Catalog(String),
    /// One file by URL (`https://…`, `gs://bucket/object`): the heavy tier's `MODEL_URL`.
    Url(String),
    /// A Hub repo (`owner/name`, optionally `@revision`), with a file for GGUF repos (`owner/name/file.gguf`).
    Repo {
        /// Repo id.
        repo: String,
        /// Revision.
        revision: String,
        /// A single file.
        file: Option<String>,
    },
}

impl ModelRef {
    /// Interprets `s` against the catalog: an existing path, else a catalog name, else `owner/name[@rev]`
    /// or `owner/name/file.gguf`.
    pub fn parse(s: &str, catalog: &crate::Catalog) -> Result<Self> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(ModelRef::Path(p.to_path_buf()));
        }
        if catalog.get(s).is_some() {
            return Ok(ModelRef::Catalog(s.to_string()));
        }
        if ["https://", "http://", "gs://"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            crate::url::http_url(s)?;
            return Ok(ModelRef::Url(s.to_string()));
        }
        let looks_local = s.starts_with('/') || s.starts_with('.') || s.starts_with('~');
        let (id, revision) = match s.split_once('@') {
            Some((a, r)) if !r.is_empty() => (a, r.to_string()),
            _ => (s, "main".to_string()),
        };
        let parts: Vec<&str> = id.split('/').collect();
        let valid = |x: &str| {
            !x.is_empty()
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match parts.as_slice() {
            [o, n] if !looks_local && valid(o) && valid(n) => Ok(ModelRef::Repo {
                repo: id.to_string(),
                revision,
                file: None,
            }),
            [o, n, f] if !looks_local && valid(o) && valid(n) && f.ends_with(".gguf") => {
                Ok(ModelRef::Repo {
                    repo: format!("{o}/{n}"),
                    revision,
                    file: Some(f.to_string()),
                })
            }
            _ => Err(ModelsError::UnknownModel(s.to_string())),
        }
    }

    /// Repo, revision and selection for Hub references (None for paths).
    pub fn hub_target(&self, catalog: &crate::Catalog) -> Option<(String, String, Selection)> {
        match self {
            ModelRef::Path(_) | ModelRef::Url(_) => None,
            ModelRef::Catalog(n) => {
                let e = catalog.get(n)?;
                Some((e.repo.clone(), e.revision.clone(), Selection::of(e)))
            }
            ModelRef::Repo {
                repo,
                revision,
                file,
            } => Some((
                repo.clone(),
                revision.clone(),
                file.clone().map_or(Selection::Mlx, Selection::File),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;

    #[test]
    fn references() {
        let c = Catalog::builtin();
        assert_eq!(
            ModelRef::parse("gemma-4-e2b", &c).unwrap(),
            ModelRef::Catalog("gemma-4-e2b".into())
        );
        assert_eq!(
            ModelRef::parse("mlx-community/gemma-4-E2B-it-4bit@v1", &c).unwrap(),
            ModelRef::Repo {
                repo: "mlx-community/gemma-4-E2B-it-4bit".into(),
                revision: "v1".into(),
                file: None
            }
        );
        assert_eq!(
            ModelRef::parse("unsloth/x-GGUF/x-Q4_0.gguf", &c).unwrap(),
            ModelRef::Repo {
                repo: "unsloth/x-GGUF".into(),
                revision: "main".into(),
                file: Some("x-Q4_0.gguf".into())
            }
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModelRef::parse(dir.path().to_str().unwrap(), &c).unwrap(),
            ModelRef::Path(_)
        ));
        for bad in [
            "/no/such/dir",
            "./missing",
            "justaname",
            "a/b/c",
            "a b/c",
            "",
        ] {
            assert!(ModelRef::parse(bad, &c).is_err(), "{bad}");
        }
    }

    #[test]
    fn selection_patterns() {
        let s = Selection::Mlx;
        for ok in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
        ] {
            assert!(s.wants(ok), "{ok}");
        }
        for no in [
            "README.md",
            "model.py",
            ".gitattributes",
            "sub/config.json",
            "x.gguf",
        ] {
            assert!(!s.wants(no), "{no}");
        }
        assert!(Selection::File("a.gguf".into()).wants("a.gguf"));
        assert!(!Selection::File("a.gguf".into()).wants("b.gguf"));
    }

    #[test]
    fn verify_checks_size_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        let spec = |size, sha256: Option<&str>, blob: Option<&str>| FileSpec {
            name: "f".into(),
            size,
            sha256: sha256.map(Into::into),
            blob_id: blob.map(Into::into),
        };
        // `git hash-object` of "hello\n" and its sha256.
        verify(
            &p,
            &spec(6, None, Some("ce013625030ba8dba906f756967f9e9ca394464a")),
        )
        .unwrap();
        verify(
            &p,
            &spec(
                6,
                Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
                None,
            ),
        )
        .unwrap();
        assert!(verify(&p, &spec(7, None, None)).is_err());
        assert!(
            verify(
                &p,
                &spec(6, None, Some("0000000000000000000000000000000000000000"))
            )
            .is_err()
        );
        assert!(verify(&p, &spec(6, Some("00"), None)).is_err());
    }
}
