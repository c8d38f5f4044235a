//! `jemma_models::Hub` against a loopback Hub: real HTTP, the real hf-hub client, the real cache layout.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod fake_hub;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fake_hub::FakeRepo;
use jemma_models::hub::{Hub, HubConfig, ModelRef, Selection};
use jemma_models::{Catalog, ModelsError, PullProgress};

const REPO: &str = "jemma-test/gemma-4-tiny-4bit";

fn weights(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn repo() -> FakeRepo {
    let mut files = BTreeMap::new();
    files.insert(
        "config.json".into(),
        br#"{"model_type":"gemma4_text"}"#.to_vec(),
    );
    files.insert("tokenizer.json".into(), br#"{"version":"1.0"}"#.to_vec());
    files.insert("README.md".into(), b"# not downloaded\n".to_vec());
    files.insert(
        "model-00001-of-00002.safetensors".into(),
        weights(700_000, 1),
    );
    files.insert(
        "model-00002-of-00002.safetensors".into(),
        weights(300_000, 2),
    );
    FakeRepo {
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        files,
        ..Default::default()
    }
}

fn hub(url: &str, cache: &Path, token: Option<&str>) -> Hub {
    Hub::new(HubConfig {
        endpoint: Some(url.into()),
        token: token.map(Into::into),
        cache_dir: Some(cache.into()),
        chunk_size: Some(64 << 10),
    })
    .unwrap()
}

type Seen = Arc<Mutex<Vec<PullProgress>>>;

fn recorder() -> (Seen, Arc<dyn Fn(PullProgress) + Send + Sync>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (seen, Arc::new(move |p| s.lock().unwrap().push(p)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_into_the_standard_cache_layout_and_reuses_it() {
    let (url, server) = fake_hub::start().await;
    server.repos.lock().unwrap().insert(REPO.into(), repo());
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&url, cache.path(), None);
    assert!(h.cached(REPO, "main", &Selection::Mlx).is_none());
    let plan = h.plan(REPO, "main", &Selection::Mlx).await.unwrap();
    let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
    assert!(!names.contains(&"README.md"), "{names:?}");
    assert_eq!(plan.total_bytes(), 1_000_000 + 28 + 17);
    let (seen, sink) = recorder();
    let dir = h.pull(&plan, sink).await.unwrap();
    // Hugging Face cache layout: models--owner--name/{blobs,snapshots/<commit>,refs/main}.
    let root = cache.path().join("models--jemma-test--gemma-4-tiny-4bit");
    assert_eq!(dir, root.join("snapshots").join(&repo().commit));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        repo().commit
    );
    for (name, data) in repo().files.iter().filter(|(n, _)| *n != "README.md") {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    assert!(!dir.join("README.md").exists());
    // Progress is monotonic and ends at the total.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
    assert_eq!(seen.last().unwrap().done_bytes, plan.total_bytes());
    assert!(seen.len() > 10, "per-chunk progress, got {}", seen.len());
    // Found without the network, as mlx-lm would find it; a second pull transfers nothing.
    assert_eq!(h.cached(REPO, "main", &Selection::Mlx).unwrap(), dir);
    // The repo a cached path belongs to, and the repos the cache holds (how drafters next to a model
    // are found).
    assert_eq!(h.repo_of(&dir.join("config.json")).as_deref(), Some(REPO));
    assert_eq!(h.repo_of(Path::new("/elsewhere/models--a--b")), None);
    assert_eq!(h.cached_repos(), vec![REPO.to_string()]);
    let before = server.log.lock().unwrap().len();
    let (_, sink) = recorder();
    assert_eq!(h.pull(&plan, sink).await.unwrap(), dir);
    assert_eq!(
        server.log.lock().unwrap().len(),
        before,
        "nothing downloaded again"
    );
}

// Single-threaded: hf-hub spawns a task per chunk and commits the contiguous prefix that completed; on one
// thread the chunks run in order (as they effectively do with its one-file-at-a-time default on real
// transfers), so what was committed before the cut is deterministic.
#[tokio::test]
async fn an_interrupted_transfer_resumes() {
    let (url, server) = fake_hub::start().await;
    server.repos.lock().unwrap().insert(REPO.into(), repo());
    let big = "model-00001-of-00002.safetensors";
    *server.cut.lock().unwrap() = Some((big.into(), 500_000));
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&url, cache.path(), None);
    let plan = h.plan(REPO, "main", &Selection::Mlx).await.unwrap();
    let (_, sink) = recorder();
    let err = h.pull(&plan, sink).await.unwrap_err();
    assert!(matches!(err, ModelsError::Download(_)), "{err}");
    let partial: Vec<_> = walk(cache.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".sync.part"))
        .collect();
    assert_eq!(partial.len(), 1, "the partial file is kept for resuming");
    // hf-hub's other chunk tasks of the failed attempt finish in the background (they are detached); wait
    // until nothing has moved for a full second so that none of them is counted as part of the retry.
    let mut sent_before = u64::MAX;
    let mut still = 0;
    while still < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now = *server.bytes_sent.lock().unwrap() + server.log.lock().unwrap().len() as u64;
        still = if now == sent_before { still + 1 } else { 0 };
        sent_before = now;
    }
    let sent_before = *server.bytes_sent.lock().unwrap();
    let log_before = server.log.lock().unwrap().len();
    let (_, sink) = recorder();
    let dir = h.pull(&plan, sink).await.unwrap();
    assert_eq!(std::fs::read(dir.join(big)).unwrap(), weights(700_000, 1));
    // The retry asked only for what was missing: its first range of that file starts past 0 (after the
    // metadata probe of byte 0), and it transferred less than the whole file.
    let log = server.log.lock().unwrap();
    let retry: Vec<_> = log[log_before..]
        .iter()
        .filter(|(f, r)| f == big && r != "bytes=0-0")
        .collect();
    let first_start: usize = retry[0].1["bytes=".len()..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first_start >= 64 << 10, "resumed at {first_start}");
    let requested: usize = retry
        .iter()
        .map(|(_, r)| {
            let (a, b) = r["bytes=".len()..].split_once('-').unwrap();
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            b.min(700_000 - 1) + 1 - a
        })
        .sum();
    assert!(
        requested < 700_000,
        "asked again for {requested} of 700000 bytes"
    );
    let resent = *server.bytes_sent.lock().unwrap() - sent_before;
    assert!(resent < 700_000 + 300_000, "re-sent {resent} bytes in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_repos_need_the_token_and_say_how_to_get_access() {
    let (url, server) = fake_hub::start().await;
    let mut r = repo();
    r.token = Some("hf_secret".into());
    server.repos.lock().unwrap().insert(REPO.into(), r);
    let cache = tempfile::tempdir().unwrap();
    let err = hub(&url, cache.path(), None)
        .plan(REPO, "main", &Selection::Mlx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("accept its license") && err.contains("401"),
        "{err}"
    );
    let err = hub(&url, cache.path(), Some("wrong"))
        .plan(REPO, "main", &Selection::Mlx)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelsError::Denied { .. }));
    let h = hub(&url, cache.path(), Some("hf_secret"));
    let plan = h.plan(REPO, "main", &Selection::Mlx).await.unwrap();
    let (_, sink) = recorder();
    h.pull(&plan, sink).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_downloads_fail_verification_and_are_removed() {
    let (url, server) = fake_hub::start().await;
    let mut r = repo();
    r.corrupt = vec!["model-00002-of-00002.safetensors".into()];
    server.repos.lock().unwrap().insert(REPO.into(), r);
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&url, cache.path(), None);
    let plan = h.plan(REPO, "main", &Selection::Mlx).await.unwrap();
    let (_, sink) = recorder();
    let err = h.pull(&plan, sink).await.unwrap_err().to_string();
    assert!(
        err.contains("sha256") && err.contains("model-00002"),
        "{err}"
    );
    assert!(
        !walk(cache.path())
            .iter()
            .any(|p| p.ends_with("model-00002-of-00002.safetensors")),
        "the bad file is gone"
    );
    // Fixed upstream: the next pull fetches only the missing file.
    server
        .repos
        .lock()
        .unwrap()
        .get_mut(REPO)
        .unwrap()
        .corrupt
        .clear();
    let (_, sink) = recorder();
    h.pull(&plan, sink).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_file_repos_and_hf_endpoint() {
    let (url, server) = fake_hub::start().await;
    let mut r = FakeRepo {
        commit: "fedcba9876543210fedcba9876543210fedcba98".into(),
        ..Default::default()
    };
    r.files.insert("m-Q4_0.gguf".into(), weights(200_000, 3));
    r.files.insert("m-Q8_0.gguf".into(), weights(400_000, 4));
    server
        .repos
        .lock()
        .unwrap()
        .insert("jemma-test/m-GGUF".into(), r);
    // HF_ENDPOINT is honoured when no endpoint is configured (this is the only test that sets it).
    unsafe { std::env::set_var("HF_ENDPOINT", &url) };
    let cache = tempfile::tempdir().unwrap();
    let h = Hub::new(HubConfig {
        cache_dir: Some(cache.path().into()),
        ..Default::default()
    })
    .unwrap();
    let c = Catalog::builtin();
    let r = ModelRef::parse("jemma-test/m-GGUF/m-Q4_0.gguf", &c).unwrap();
    let (repo, rev, sel) = r.hub_target(&c).unwrap();
    let plan = h.plan(&repo, &rev, &sel).await.unwrap();
    assert_eq!(plan.files.len(), 1);
    let (_, sink) = recorder();
    let file = h.pull(&plan, sink).await.unwrap();
    assert!(file.ends_with("m-Q4_0.gguf"));
    assert_eq!(std::fs::read(&file).unwrap(), weights(200_000, 3));
    assert_eq!(h.cached(&repo, &rev, &sel).unwrap(), file);
    assert!(
        h.cached(&repo, &rev, &Selection::File("m-Q8_0.gguf".into()))
            .is_none()
    );
    let missing = h
        .plan("jemma-test/nope", "main", &Selection::Mlx)
        .await
        .unwrap_err();
    assert!(matches!(missing, ModelsError::NotFound(_)), "{missing}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
