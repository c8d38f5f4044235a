//! Fetching `image_url`s given as http(s) URLs, for the engines that see images here: with a timeout, a
//! size cap read as the body arrives, an `image/*` content type, and no way into this machine's or its
//! networks' private services (server-side request forgery through the gateway). Every address a name
//! resolves to, and every literal address, on the first request and on each redirect, must be public
//! unless `[limits] fetch_private_media_urls` allows private ones (a test's loopback file server, a LAN
//! image store).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

/// The process's fetchers, one per setting of `allow_private` (clients are built once and reused).
pub fn fetcher(timeout: Duration, allow_private: bool) -> Result<ImageFetcher, String> {
    static STRICT: std::sync::OnceLock<Result<ImageFetcher, String>> = std::sync::OnceLock::new();
    static OPEN: std::sync::OnceLock<Result<ImageFetcher, String>> = std::sync::OnceLock::new();
    let cell = if allow_private { &OPEN } else { &STRICT };
    cell.get_or_init(|| ImageFetcher::new(timeout, allow_private))
        .clone()
}

/// Why a fetch was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// The URL leads to a loopback, private, link-local or otherwise non-public address (HTTP 400).
    #[error(
        "{0} is not a public address: image URLs may not reach this machine or its private networks"
    )]
    Private(String),
    /// The server did not give an image (HTTP 400).
    #[error("{0}")]
    Bad(String),
    /// The image is larger than the limit (HTTP 413).
    #[error("the image at the URL exceeds {0} bytes")]
    TooLarge(usize),
}

/// Whether `ip` is an address anyone may reach: not loopback, unspecified, private (RFC 1918, unique local),
/// carrier-grade NAT (RFC 6598: the tailnet's 100.64/10), link-local, multicast, broadcast or documentation.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            // IPv4 inside IPv6: NAT64 (64:ff9b::/96, 64:ff9b:1::/48), IPv4-compatible (::a.b.c.d), 6to4
            // (2002::/16): public only if the IPv4 address is.
            if (s[0] == 0x64 && s[1] == 0xff9b) || s[..6].iter().all(|&x| x == 0) {
                return is_public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// Resolves names to public addresses only (the check happens where the connection is made, so a name
/// that resolves differently a second time cannot slip through).
struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(
                    Box::new(FetchError::Private(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The literal address of a URL's host, if it is one.
fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// An HTTP client for image URLs.
#[derive(Clone)]
pub struct ImageFetcher {
    client: reqwest::Client,
    allow_private: bool,
}

impl ImageFetcher {
    /// A fetcher that gives each image `timeout` in all; `allow_private` lets URLs reach private and
    /// loopback addresses.
    ///
    /// Errors: the TLS backend cannot start.
    pub fn new(timeout: Duration, allow_private: bool) -> Result<Self, String> {
        // No proxy from the environment (HTTP_PROXY and the like): a proxy resolves the name itself, where
        // the resolver below could not check it.
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("jemma/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            b = b.dns_resolver(Arc::new(PublicResolver)).redirect(
                reqwest::redirect::Policy::custom(|a| {
                    if a.previous().len() >= 5 {
                        a.error("too many redirects")
                    } else if let Some(ip) = literal_ip(a.url()).filter(|ip| !is_public(*ip)) {
                        a.error(FetchError::Private(ip.to_string()))
                    } else {
                        a.follow()
                    }
                }),
            );
        }
        Ok(Self {
            client: b.build().map_err(|e| e.to_string())?,
            allow_private,
        })
    }

    /// The bytes of the image at `url` (http or https), at most `max_bytes`.
    ///
    /// Errors: [`FetchError::Private`] for a non-public address; [`FetchError::TooLarge`] past `max_bytes`;
    /// [`FetchError::Bad`] for an error status, a type that is not `image/*`, or a failed transfer.
    pub async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
        self.fetch_kind(url, max_bytes, "image/").await
    }

    /// [`ImageFetcher::fetch`] for media whose content type starts with `kind` (`image/`, `video/`).
    ///
    /// Errors: as [`ImageFetcher::fetch`].
    pub async fn fetch_kind(
        &self,
        url: &str,
        max_bytes: usize,
        kind: &str,
    ) -> Result<Vec<u8>, FetchError> {
        let what = kind.trim_end_matches('/');
        let parsed =
            reqwest::Url::parse(url).map_err(|e| FetchError::Bad(format!("bad URL: {e}")))?;
        if !self.allow_private
            && let Some(ip) = literal_ip(&parsed).filter(|ip| !is_public(*ip))
        {
            return Err(FetchError::Private(ip.to_string()));
        }
        let resp = self.client.get(parsed).send().await.map_err(|e| {
            // The resolver's or the redirect policy's refusal, under reqwest's wrapping.
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = src {
                if let Some(f) = s.downcast_ref::<FetchError>() {
                    return f.clone();
                }
                src = s.source();
            }
            FetchError::Bad(format!("fetching the {what} failed: {e}"))
        })?;
        if !resp.status().is_success() {
            return Err(FetchError::Bad(format!(
                "the {what} URL answered {}",
                resp.status()
            )));
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ctype.starts_with(kind) {
            return Err(FetchError::Bad(format!(
                "the URL is not {} {what} (content type {:?})",
                if what == "image" { "an" } else { "a" },
                ctype
            )));
        }
        if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
            return Err(FetchError::TooLarge(max_bytes));
        }
        let mut body = resp.bytes_stream();
        let mut out = vec![];
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| FetchError::Bad(format!("reading the image failed: {e}")))?;
            if out.len() + chunk.len() > max_bytes {
                return Err(FetchError::TooLarge(max_bytes));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.9",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "198.18.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "100.128.0.1",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    /// A one-shot HTTP server on loopback answering `response` (raw bytes) to the first request.
    async fn serve_once(response: Vec<u8>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&response).await;
            }
        });
        format!("http://{addr}")
    }

    fn http(ctype: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed_and_the_checks_hold() {
        let url = serve_once(http("image/png", b"\x89PNG....")).await;
        let strict = ImageFetcher::new(Duration::from_secs(5), false).unwrap();
        assert!(matches!(
            strict.fetch(&format!("{url}/a.png"), 1000).await,
            Err(FetchError::Private(_))
        ));
        // A name that resolves to loopback is refused where it is resolved.
        let port = url.rsplit(':').next().unwrap();
        assert!(matches!(
            strict
                .fetch(&format!("http://localhost:{port}/a.png"), 1000)
                .await,
            Err(FetchError::Private(_))
        ));
        let open = ImageFetcher::new(Duration::from_secs(5), true).unwrap();
        assert_eq!(
            open.fetch(&format!("{url}/a.png"), 1000).await.unwrap(),
            b"\x89PNG...."
        );
        assert_eq!(
            open.fetch(&format!("{url}/a.png"), 4).await,
            Err(FetchError::TooLarge(4))
        );
        let html = serve_once(http("text/html", b"<html>")).await;
        assert!(matches!(
            open.fetch(&format!("{html}/"), 1000).await,
            Err(FetchError::Bad(m)) if m.contains("not an image")
        ));
    }
}
