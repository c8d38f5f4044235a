//! Plain HTTP(S) and Google Cloud Storage downloads of one model file (the heavy tier's `MODEL_URL`): resumed
//! from a `.part` file with a range request, progress reported as it goes, the size checked against
//! `Content-Length`, an optional SHA-256 checked at the end. `gs://bucket/object` is fetched through the
//! Storage JSON/XML endpoint with the instance's service-account token when running on Google Cloud.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::PullProgress;
use crate::{ModelsError, Result};

/// Where `gs://` objects are read from (overridable for tests with `JEMMA_GCS_ENDPOINT`).
fn gcs_endpoint() -> String {
    std::env::var("JEMMA_GCS_ENDPOINT").unwrap_or_else(|_| "https://storage.googleapis.com".into())
}

/// `gs://bucket/object` → its HTTPS URL; other URLs unchanged.
pub fn http_url(url: &str) -> Result<String> {
    match url.strip_prefix("gs://") {
        Some(rest) => {
            let (bucket, object) = rest
                .split_once('/')
                .filter(|(b, o)| !b.is_empty() && !o.is_empty())
                .ok_or_else(|| {
                    ModelsError::Download(format!("{url}: expected gs://BUCKET/OBJECT"))
                })?;
            Ok(format!("{}/{bucket}/{object}", gcs_endpoint()))
        }
        None if url.starts_with("https://") || url.starts_with("http://") => Ok(url.to_string()),
        None => Err(ModelsError::Download(format!(
            "{url}: MODEL_URL must be https://, http:// or gs://"
        ))),
    }
}

/// The service account's access token from the metadata server, when running on Google Cloud.
async fn metadata_token(client: &reqwest::Client) -> Option<String> {
    let host =
        std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| "metadata.google.internal".into());
    let r = client
        .get(format!(
            "http://{host}/computeMetadata/v1/instance/service-accounts/default/token"
        ))
        .header("Metadata-Flavor", "Google")
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v.get("access_token")?.as_str().map(String::from)
}

/// Downloads `url` into `dir` (file name from the URL), resuming a previous partial download; returns the
/// file's path. `sha256`, when given, is verified.
pub async fn download(
    url: &str,
    dir: &Path,
    sha256: Option<&str>,
    on_progress: Arc<dyn Fn(PullProgress) + Send + Sync>,
) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelsError::Io { path, source }
    };
    let http = http_url(url)?;
    let name = http
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .map(|n| n.split('?').next().unwrap_or(n).to_string())
        .ok_or_else(|| ModelsError::Download(format!("{url}: no file name")))?;
    tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
    let dest = dir.join(&name);
    let part = dir.join(format!("{name}.part"));
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| ModelsError::Download(e.to_string()))?;
    let token = if url.starts_with("gs://") {
        metadata_token(&client).await
    } else {
        None
    };
    let with_auth = |r: reqwest::RequestBuilder| match &token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    // The size, to know whether a finished file or a partial one is there.
    let head = with_auth(client.head(&http))
        .send()
        .await
        .map_err(|e| ModelsError::Download(format!("{url}: {e}")))?;
    let status = head.status().as_u16();
    if status == 401 || status == 403 {
        return Err(ModelsError::Download(format!(
            "{url}: access denied (HTTP {status}); on Cloud Run give the service account read access"
        )));
    }
    if status == 404 {
        return Err(ModelsError::NotFound(url.to_string()));
    }
    let total = head
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ModelsError::Download(format!("{url}: no Content-Length")))?;
    let report = |done: u64| {
        on_progress(PullProgress {
            file: name.clone(),
            done_bytes: done,
            total_bytes: total,
        })
    };
    if tokio::fs::metadata(&dest).await.ok().map(|m| m.len()) == Some(total) {
        report(total);
        return Ok(dest);
    }
    let mut have = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if have > total {
        have = 0;
    }
    let mut req = with_auth(client.get(&http));
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ModelsError::Download(format!("{url}: {e}")))?;
    let resumed = resp.status().as_u16() == 206;
    if !resp.status().is_success() {
        return Err(ModelsError::Download(format!(
            "{url}: HTTP {}",
            resp.status()
        )));
    }
    if !resumed {
        have = 0;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&part)
        .await
        .map_err(io(&part))?;
    let mut stream = resp.bytes_stream();
    let mut done = have;
    report(done);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ModelsError::Download(format!("{url}: transfer interrupted at {done} bytes: {e}"))
        })?;
        f.write_all(&chunk).await.map_err(io(&part))?;
        done += chunk.len() as u64;
        report(done);
    }
    f.flush().await.map_err(io(&part))?;
    drop(f);
    if done != total {
        return Err(ModelsError::Verify {
            file: name,
            why: format!("{done} bytes, the server said {total}"),
        });
    }
    if let Some(want) = sha256 {
        let p = part.clone();
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut h = sha2::Sha256::new();
            let mut f = std::fs::File::open(&p)?;
            std::io::copy(&mut f, &mut h)?;
            Ok(hex::encode(h.finalize()))
        })
        .await
        .map_err(|e| ModelsError::Download(e.to_string()))?
        .map_err(io(&part))?;
        if !got.eq_ignore_ascii_case(want) {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(ModelsError::Verify {
                file: name,
                why: format!("sha256 {got}, expected {want}"),
            });
        }
    }
    tokio::fs::rename(&part, &dest).await.map_err(io(&dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            http_url("gs://models/gemma/x.gguf").unwrap(),
            format!("{}/models/gemma/x.gguf", gcs_endpoint())
        );
        assert_eq!(http_url("https://a/b.gguf").unwrap(), "https://a/b.gguf");
        assert!(http_url("gs://bucket-only").is_err());
        assert!(http_url("ftp://x/y").is_err());
    }
}
