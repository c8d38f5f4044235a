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

/// The keyword of llama.cpp's Gemma 4 assistant (MTP) drafter sidecars in GGUF repos (`mtp-…gguf`).
pub const MTP_SIDECAR: &str = "mtp-";

/// The names llama.cpp's downloader does not take for a model (`gguf_filename_is_model` in
/// `common/download.cpp`): projectors, importance matrices and speculative-decoding sidecars.
const NOT_MODELS: [&str; 6] = ["mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-"];

/// Whether the GGUF file `name` (a path or a file name) is a model by llama.cpp's naming, not a projector,
/// an importance matrix or a speculative-decoding sidecar.
pub fn gguf_is_model(name: &str) -> bool {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.ends_with(".gguf") && !NOT_MODELS.iter().any(|k| file.contains(k))
}

/// The tag of a GGUF name, upper-cased, as llama.cpp reads it (`get_gguf_split_info`): the last
/// `-`/`.`-separated run of letters, digits and `_` of the stem, a split's suffix (`-00001-of-00002`)
/// removed — `gemma-4-E4B-it-Q4_K_M.gguf` → `Q4_K_M`; "" for a name that is no GGUF or has none.
pub fn gguf_tag(name: &str) -> String {
    let Some(stem) = name.strip_suffix(".gguf") else {
        return String::new();
    };
    let split = |tail: &[u8]| {
        tail.len() == 15
            && tail[0] == b'-'
            && tail[1..6].iter().all(u8::is_ascii_digit)
            && tail[6..10].eq_ignore_ascii_case(b"-of-")
            && tail[10..].iter().all(u8::is_ascii_digit)
    };
    let stem = match stem.len().checked_sub(15) {
        // An ASCII tail: the cut is a character boundary.
        Some(i) if split(&stem.as_bytes()[i..]) => &stem[..i],
        _ => stem,
    };
    stem.rsplit(['-', '.'])
        .next()
        .filter(|t| {
            !t.is_empty()
                && t.len() < stem.len()
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// The bits a tag names, as llama.cpp reads them: the number its first digit starts (`Q4_K_M` → 4,
/// `F16` → 16, `UD-Q4_K_XL` → 4); 0 without a digit.
fn tag_bits(tag: &str) -> u32 {
    let digits: String = tag
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

/// The quantization's bits in a GGUF name's tag, as llama.cpp reads them (`extract_quant_bits`):
/// `…-Q4_K_M.gguf` → 4, `…-F16.gguf` → 16, `…-Q8_0.gguf` → 8; 0 without a tag or a digit in it.
pub fn quant_bits(name: &str) -> u32 {
    tag_bits(&gguf_tag(name))
}

/// The sibling GGUF of the GGUF `model` among a repo's `files` (paths) whose path contains `keyword`
/// (`mmproj`, [`MTP_SIDECAR`]), as llama.cpp's downloader picks one (`find_best_sibling` in
/// `common/download.cpp`): only a file in the model's directory or one above it; the deepest such
/// directory first, then one named with the exact `tag` (`-Q8_0.`; "" for none), then the quantization
/// closest to the tag's (to the model's without one). None when no file qualifies.
pub fn best_sibling(files: &[String], model: &str, keyword: &str, tag: &str) -> Option<String> {
    let tag = tag.to_ascii_uppercase();
    let wanted_bits = if tag.is_empty() {
        quant_bits(model)
    } else {
        tag_bits(&tag)
    };
    let model_dirs: Vec<&str> = model.split('/').collect();
    let model_dirs = &model_dirs[..model_dirs.len() - 1];
    let mut best: Option<(usize, bool, u32, &String)> = None;
    for f in files {
        if !f.ends_with(".gguf") || !f.contains(keyword) {
            continue;
        }
        let dirs: Vec<&str> = f.split('/').collect();
        let dirs = &dirs[..dirs.len() - 1];
        // Only the model's own directory or one above it.
        if dirs.len() > model_dirs.len() || dirs != &model_dirs[..dirs.len()] {
            continue;
        }
        let depth = dirs.len();
        let exact = !tag.is_empty() && f.to_ascii_uppercase().contains(&format!("-{tag}."));
        let diff = quant_bits(f).abs_diff(wanted_bits);
        let better = match best {
            None => true,
            Some((d, e, df, _)) => {
                depth > d || (depth == d && exact && !e) || (depth == d && exact == e && diff < df)
            }
        };
        if better {
            best = Some((depth, exact, diff, f));
        }
    }
    best.map(|(.., f)| f.clone())
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

    /// The root of the snapshot `path` lies in (`<cache>/models--owner--name/snapshots/<commit>`), if it
    /// lies in one of this cache.
    pub fn snapshot_of(&self, path: &Path) -> Option<PathBuf> {
        if let Ok(rel) = path.strip_prefix(self.cache_dir()) {
            let mut c = rel.components();
            let repo = c.next()?.as_os_str().to_str()?;
            (repo.starts_with("models--") && c.next()?.as_os_str() == "snapshots").then_some(())?;
            let commit = c.next()?;
            return Some(self.cache_dir().join(repo).join("snapshots").join(commit));
        }
        // The cache's layout under another spelling of its path (a symlinked or canonicalized one):
        // `…/models--owner--name/snapshots/<commit>/…`.
        path.ancestors()
            .find(|a| {
                let up = a.parent();
                up.and_then(Path::file_name)
                    .is_some_and(|n| n == "snapshots")
                    && up
                        .and_then(Path::parent)
                        .and_then(Path::file_name)
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("models--"))
            })
            .map(Path::to_path_buf)
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
        let info = self.info(repo, revision).await?;
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

    /// The paths of every file of `repo@revision`, as the Hub lists them.
    ///
    /// Errors: as [`Hub::plan`] (denied, not found, the Hub unreachable or answering otherwise).
    pub async fn files(&self, repo: &str, revision: &str) -> Result<Vec<String>> {
        let info = self.info(repo, revision).await?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// The Gemma 4 assistant (MTP) drafter `repo@revision` ships for its GGUF `model` (a path in the
    /// repo), by llama.cpp's sidecar convention ([`best_sibling`] with `mtp-` and the model's own tag):
    /// what `llama-server -hf <repo>:<the model's tag>` fetches with it. None when the repo has none.
    ///
    /// Errors: as [`Hub::files`].
    pub async fn mtp_sidecar(
        &self,
        repo: &str,
        revision: &str,
        model: &str,
    ) -> Result<Option<String>> {
        let files = self.files(repo, revision).await?;
        Ok(best_sibling(&files, model, MTP_SIDECAR, &gguf_tag(model)))
    }

    /// The repo's info with its files (`GET /api/models/{repo}/revision/{revision}?blobs=true`).
    async fn info(&self, repo: &str, revision: &str) -> Result<ApiInfo> {
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
        serde_json::from_str(&text)
            .map_err(|e| ModelsError::Download(format!("{repo}: unexpected Hub answer: {e}")))
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

    /// llama.cpp's sidecar rule (`find_best_sibling`, `extract_quant_bits`, `gguf_filename_is_model`), on
    /// the layouts GGUF repos use: a sidecar beside the model or above it, never in another directory;
    /// the deepest first, then the exact tag, then the closest quantization.
    #[test]
    fn sidecars_are_picked_as_llama_cpp_picks_them() {
        assert_eq!(quant_bits("gemma-4-E4B-it-Q4_K_M.gguf"), 4);
        assert_eq!(quant_bits("gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf"), 4);
        assert_eq!(quant_bits("mtp-gemma-4-E4B-it-F16.gguf"), 16);
        assert_eq!(
            quant_bits("BF16/gemma-4-31B-it-BF16-00002-of-00003.gguf"),
            16
        );
        assert_eq!(quant_bits("mtp-gemma-4-12B-it.gguf"), 0);
        assert_eq!(quant_bits("mtp-gemma-4-12B-it.Q8_0.gguf"), 8);
        assert_eq!(quant_bits("not-a-gguf.bin"), 0);
        assert_eq!(quant_bits("é-00001-of-00002.gguf"), 0);
        assert_eq!(gguf_tag("gemma-4-E4B-it-q4_k_m.gguf"), "Q4_K_M");
        assert_eq!(
            gguf_tag("BF16/gemma-4-31B-it-BF16-00002-of-00003.gguf"),
            "BF16"
        );
        assert_eq!(gguf_tag("mtp-gemma-4-12B-it.gguf"), "IT");
        assert_eq!(gguf_tag("model.bin"), "");
        assert_eq!(tag_bits("UD-Q4_K_XL"), 4);
        assert_eq!(tag_bits("Q4-UD"), 4);
        let files = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let repo = files(&[
            "README.md",
            "gemma-4-E4B-it-Q4_K_M.gguf",
            "gemma-4-E4B-it-Q8_0.gguf",
            "mmproj-F16.gguf",
            "mtp-gemma-4-E4B-it-F16.gguf",
            "mtp-gemma-4-E4B-it-Q8_0.gguf",
            "mtp-gemma-4-E4B-it-Q4_0.gguf",
            "MTP/gemma-4-E4B-it-MTP-F16.gguf",
            "other/mtp-gemma-4-E4B-it-Q4_K_M.gguf",
        ]);
        let mtp = |model: &str, tag: &str| best_sibling(&repo, model, MTP_SIDECAR, tag);
        // The quantization closest to the model's, beside it; another directory's never.
        assert_eq!(
            mtp("gemma-4-E4B-it-Q4_K_M.gguf", "").as_deref(),
            Some("mtp-gemma-4-E4B-it-Q4_0.gguf")
        );
        assert_eq!(
            mtp("gemma-4-E4B-it-Q8_0.gguf", "").as_deref(),
            Some("mtp-gemma-4-E4B-it-Q8_0.gguf")
        );
        // The model's own tag, as `-hf repo:TAG` passes it: the exact quantization over one as close.
        let both = files(&["m-Q4_K_M.gguf", "mtp-m-Q4_0.gguf", "mtp-m-Q4_K_M.gguf"]);
        assert_eq!(
            best_sibling(
                &both,
                "m-Q4_K_M.gguf",
                MTP_SIDECAR,
                &gguf_tag("m-Q4_K_M.gguf")
            )
            .as_deref(),
            Some("mtp-m-Q4_K_M.gguf")
        );
        // The exact tag over the closest bits.
        assert_eq!(
            mtp("gemma-4-E4B-it-Q4_K_M.gguf", "f16").as_deref(),
            Some("mtp-gemma-4-E4B-it-F16.gguf")
        );
        // A model in a subdirectory takes its own directory's sidecar first, else the root's.
        assert_eq!(
            mtp("other/gemma-4-E4B-it-Q4_K_M.gguf", "").as_deref(),
            Some("other/mtp-gemma-4-E4B-it-Q4_K_M.gguf")
        );
        assert_eq!(
            mtp("BF16/gemma-4-E4B-it-BF16-00001-of-00002.gguf", "").as_deref(),
            Some("mtp-gemma-4-E4B-it-F16.gguf")
        );
        // Unsloth's `MTP/…-MTP-…` files are not llama.cpp sidecars (no lowercase `mtp-`).
        assert_eq!(
            best_sibling(
                &files(&["m-Q4_0.gguf", "MTP/m-MTP-F16.gguf"]),
                "m-Q4_0.gguf",
                MTP_SIDECAR,
                ""
            ),
            None
        );
        assert_eq!(
            best_sibling(&repo, "gemma-4-E4B-it-Q4_K_M.gguf", "mmproj", "").as_deref(),
            Some("mmproj-F16.gguf")
        );
        assert!(gguf_is_model("gemma-4-E4B-it-Q4_K_M.gguf"));
        for not in [
            "mmproj-F16.gguf",
            "sub/mtp-x-Q8_0.gguf",
            "imatrix.gguf",
            "x-Q4_0.bin",
        ] {
            assert!(!gguf_is_model(not), "{not}");
        }
    }

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
