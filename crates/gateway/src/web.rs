//! The chat page served at `/`: the same `ui/` the app's chat window shows, for phones and browsers on the
//! tailnet (the original design's web client, without a public proxy). The page and its script are public
//! like `/health`; every API call it makes carries the API key the visitor enters, which stays in that
//! browser's storage. Files are compiled in, so a `jemma` binary needs nothing beside it.

use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page's files as `(path, content type, body)`: `index.html` at `/`, its stylesheet, and its script
/// with the ES modules it imports (`ui/lib/`, relative to the page, so the app's window and this page load
/// the same tree).
pub const FILES: [(&str, &str, &str); 8] = [
    ("/", HTML, include_str!("../../../ui/index.html")),
    ("/style.css", CSS, include_str!("../../../ui/style.css")),
    ("/chat.js", JS, include_str!("../../../ui/chat.js")),
    (
        "/lib/markdown.js",
        JS,
        include_str!("../../../ui/lib/markdown.js"),
    ),
    (
        "/lib/openai.js",
        JS,
        include_str!("../../../ui/lib/openai.js"),
    ),
    ("/lib/sse.js", JS, include_str!("../../../ui/lib/sse.js")),
    (
        "/lib/store.js",
        JS,
        include_str!("../../../ui/lib/store.js"),
    ),
    ("/lib/text.js", JS, include_str!("../../../ui/lib/text.js")),
];

/// Whether `path` is one of the page's files, which are open without a key.
pub fn is_page(path: &str) -> bool {
    FILES.iter().any(|(p, _, _)| *p == path)
}

/// `GET` of one of [`FILES`] (the router mounts this handler on each of their paths).
pub async fn page(uri: Uri) -> Response {
    let Some((_, content_type, body)) = FILES.iter().find(|(p, _, _)| *p == uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *content_type),
            // A new binary may ship a new page: revalidate rather than run a stale script.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page holds a key field: no other site may frame it.
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        *body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module a served script imports is served too, and every file in `ui/lib/` is in the table:
    /// a module added to the page without a route here would load in the app's window and fail in a
    /// browser on the tailnet.
    #[test]
    fn every_imported_module_is_served() {
        for (path, _, body) in FILES.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            let dir = &path[..path.rfind('/').unwrap() + 1];
            for line in body.lines().filter(|l| l.starts_with("import ")) {
                let spec = line
                    .rsplit(" from ")
                    .next()
                    .unwrap()
                    .trim_end_matches(';')
                    .trim_matches('\'');
                let rel = spec.strip_prefix("./").expect("relative import");
                let target = format!("{dir}{rel}");
                assert!(
                    is_page(&target),
                    "{path} imports {target}, which is not served"
                );
            }
        }
        let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ui/lib");
        for entry in std::fs::read_dir(lib).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                is_page(&format!("/lib/{name}")),
                "ui/lib/{name} is not served"
            );
        }
    }
}
