//! The chat page served at `/`: the same `ui/` the app's chat window shows, for phones and browsers on the
//! tailnet (the original design's web client, without a public proxy). The page and its script are public
//! like `/health`; every API call it makes carries the API key the visitor enters, which stays in that
//! browser's storage. Files are compiled in, so a `jemma` binary needs nothing beside it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../../ui/index.html");
const CHAT_JS: &str = include_str!("../../../ui/chat.js");
const STYLE_CSS: &str = include_str!("../../../ui/style.css");

/// Paths of the page, open without a key.
pub const PATHS: [&str; 3] = ["/", "/chat.js", "/style.css"];

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // A new binary may ship a new page: revalidate rather than run a stale script.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page holds a key field: no other site may frame it.
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the chat page.
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /chat.js`.
pub async fn chat_js() -> Response {
    file("text/javascript; charset=utf-8", CHAT_JS)
}

/// `GET /style.css`.
pub async fn style_css() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}
