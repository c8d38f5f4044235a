//! A loopback server speaking the parts of the Hugging Face Hub API that downloads use: the repo info API
//! (`/api/models/{repo}/revision/{rev}?blobs=true`) and `resolve` with range requests and the headers
//! hf-hub reads (`x-repo-commit`, `etag`/`x-linked-etag`, `content-range`). Faults can be injected: a
//! transfer cut after N bytes, a gated repo, a file whose bytes differ from its advertised hash. Shared by
//! the jemma-models tests and the gateway end-to-end tests (included with `#[path]`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha1::Digest as _;

/// One repo.
#[derive(Clone, Default)]
pub struct FakeRepo {
    /// Commit id reported for every revision.
    pub commit: String,
    /// Files by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Required bearer token (a gated repo).
    pub token: Option<String>,
    /// Files whose served bytes are flipped (the advertised hash stays the original's).
    pub corrupt: Vec<String>,
}

/// Server state, inspectable by tests.
#[derive(Default)]
pub struct Hub {
    /// Repos by id.
    pub repos: Mutex<BTreeMap<String, FakeRepo>>,
    /// (file, offset): the next range request covering `offset` of that file is cut there.
    pub cut: Mutex<Option<(String, usize)>>,
    /// (path, range header) of every resolve request.
    pub log: Mutex<Vec<(String, String)>>,
    /// Body bytes sent by resolve requests.
    pub bytes_sent: Mutex<u64>,
    /// Delay per 64 KiB of body (to watch progress).
    pub throttle_ms: Mutex<u64>,
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

/// Git blob id of content.
pub fn git_blob_id(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex::encode(h.finalize())
}

/// SHA-256 of content.
pub fn sha256(data: &[u8]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(data);
    hex::encode(h.finalize())
}

fn authorized(repo: &FakeRepo, headers: &HeaderMap) -> bool {
    match &repo.token {
        None => true,
        Some(t) => {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {t}"))
        }
    }
}

async fn info(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, _rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = format!("{owner}/{name}");
    let Some(repo) = hub.repos.lock().unwrap().get(&id).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            "{\"error\":\"Repository not found\"}",
        )
            .into_response();
    };
    if !authorized(&repo, &headers) {
        return (StatusCode::UNAUTHORIZED, "{\"error\":\"gated\"}").into_response();
    }
    let siblings: Vec<_> = repo
        .files
        .iter()
        .map(|(n, d)| {
            let mut s =
                serde_json::json!({"rfilename": n, "size": d.len(), "blobId": git_blob_id(d)});
            if is_lfs(n) {
                s["lfs"] =
                    serde_json::json!({"sha256": sha256(d), "size": d.len(), "pointerSize": 134});
            }
            s
        })
        .collect();
    axum::Json(serde_json::json!({"id": id, "sha": repo.commit, "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = format!("{owner}/{name}");
    let Some(repo) = hub.repos.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(&repo, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(data) = repo.files.get(&file).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    hub.log.lock().unwrap().push((file.clone(), range.clone()));
    let len = data.len();
    let (start, end) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().unwrap_or(len))))
        .map(|(a, b)| (a, b.min(len.saturating_sub(1))))
        .unwrap_or((0, len.saturating_sub(1)));
    let mut body = data[start.min(len)..(end + 1).min(len)].to_vec();
    if repo.corrupt.contains(&file) {
        for b in body.iter_mut() {
            *b ^= 0x5a;
        }
    }
    let etag = if is_lfs(&file) {
        sha256(&data)
    } else {
        git_blob_id(&data)
    };
    let mut resp = Response::builder()
        .status(if range.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::PARTIAL_CONTENT
        })
        .header("x-repo-commit", &repo.commit)
        .header(header::ETAG, format!("\"{etag}\""))
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
        .header(header::ACCEPT_RANGES, "bytes");
    if is_lfs(&file) {
        resp = resp
            .header("x-linked-etag", format!("\"{etag}\""))
            .header("x-linked-size", len);
    }
    // A cut: send part of the body, then fail the connection mid-transfer.
    let cut = {
        let mut c = hub.cut.lock().unwrap();
        match c.as_ref() {
            Some((f, at)) if *f == file && end > start && (start..=end).contains(at) => {
                let at = *at - start;
                *c = None;
                Some(at)
            }
            _ => None,
        }
    };
    let throttle = *hub.throttle_ms.lock().unwrap();
    let hub2 = hub.clone();
    let stream = async_stream(body, cut, throttle, hub2);
    resp.header(header::CONTENT_LENGTH, end + 1 - start)
        .body(Body::from_stream(stream))
        .unwrap()
}

fn async_stream(
    body: Vec<u8>,
    cut: Option<usize>,
    throttle_ms: u64,
    hub: Arc<Hub>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let limit = cut.unwrap_or(body.len());
        for chunk in body[..limit].chunks(64 << 10) {
            if throttle_ms > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(throttle_ms)).await;
            }
            *hub.bytes_sent.lock().unwrap() += chunk.len() as u64;
            if tx.send(Ok(chunk.to_vec())).await.is_err() {
                return;
            }
        }
        if cut.is_some() {
            let _ = tx
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "cut",
                )))
                .await;
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Starts the server on a free loopback port; returns its base URL and state.
pub async fn start() -> (String, Arc<Hub>) {
    let hub = Arc::new(Hub::default());
    let app = axum::Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, hub)
}
