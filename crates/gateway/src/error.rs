//! The one mapping from errors to HTTP: OpenAI's `{"error": {"message", "type", "param", "code"}}` with the
//! right status (400, 404, 413, 429 + Retry-After, 503 (+ Retry-After when a tier said when it may serve
//! again), 504).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::api::{ErrorObject, ErrorResponse};

/// An error answer.
#[derive(Debug)]
pub struct ApiError(pub RouterError);

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        Self(e)
    }
}

impl ApiError {
    /// Status, OpenAI error type and code.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match &self.0 {
            RouterError::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            RouterError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            RouterError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            RouterError::UnsupportedMedia { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
            ),
            RouterError::UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            RouterError::Busy { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "tier_busy",
            ),
            RouterError::AllTiersDown { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "all_tiers_down",
            ),
            RouterError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", "upstream_timeout"),
            RouterError::Config(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "configuration",
            ),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorResponse {
        let (_, ty, code) = self.parts();
        let param = match &self.0 {
            RouterError::InvalidRequest { param, .. }
            | RouterError::TooLarge { param, .. }
            | RouterError::UnsupportedMedia { param, .. } => param.clone(),
            RouterError::UnknownModel(_) => Some("model".into()),
            _ => None,
        };
        let fallback = match &self.0 {
            RouterError::AllTiersDown { fallback, .. } => Some(fallback.clone()),
            _ => None,
        };
        ErrorResponse {
            error: ErrorObject {
                message: self.0.to_string(),
                kind: ty.into(),
                param,
                code: Some(code.into()),
                fallback,
            },
        }
    }
}

/// The `Retry-After` an error answer carries, in seconds: when the caller's budget refills (429), when a
/// busy tier may have room, when a tier may serve again (503, where one said).
pub(crate) fn retry_after(e: &RouterError) -> Option<u64> {
    match e {
        RouterError::Busy { retry_after_secs } | RouterError::RateLimited { retry_after_secs } => {
            Some(*retry_after_secs)
        }
        RouterError::AllTiersDown {
            retry_after_secs, ..
        } => *retry_after_secs,
        _ => None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        let mut r = (status, axum::Json(self.body())).into_response();
        if let Some(secs) = retry_after(&self.0)
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_carries_retry_after_when_a_tier_said_when() {
        let down = |retry_after_secs| {
            ApiError(RouterError::AllTiersDown {
                fallback: vec!["heavy→none: breaker open".into()],
                retry_after_secs,
            })
            .into_response()
        };
        let r = down(Some(4));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "4");
        assert!(down(None).headers().get(header::RETRY_AFTER).is_none());
    }

    /// A 413 or 415 about a media part names it in `param`, as a 400 does; a body too large names nothing.
    #[test]
    fn media_refusals_name_their_part() {
        let part = "messages[0].content[1].input_audio.data";
        for (e, status) in [
            (
                RouterError::too_large("too long", Some(part)),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                RouterError::unsupported_media("AIFF", part),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
        ] {
            let e = ApiError(e);
            assert_eq!(e.parts().0, status);
            assert_eq!(e.body().error.param.as_deref(), Some(part));
        }
        let body = ApiError(RouterError::too_large("body", None)).body();
        assert_eq!(body.error.param, None);
    }
}
