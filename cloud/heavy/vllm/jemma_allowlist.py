"""Route allowlist for the heavy tier's vLLM server: only /v1/... and /health reach vLLM.

vLLM's --api-key (VLLM_API_KEY) is checked only under /v1 (and /v2, /inference): /invocations runs the same
inference without a key, and /pause, /update_weights, /tokenize, /metrics, ... are open too (vLLM's
docs/usage/security.md, "API Key Authentication Limitations", which advises an allowlist in front). The Cloud
Run service is public, with the bearer key as its only guard, so every other route is answered 404 here
before vLLM's routing sees it. Cloud Run's probes use /health; Jemma uses /v1/... (chat, completions, and
/v1/models for its pool probes).

Loaded by `vllm serve --middleware jemma_allowlist.AllowlistMiddleware` (vLLM adds a class with
app.add_middleware); a plain ASGI class, so streamed answers pass through untouched.
"""

ALLOWED_PATHS = frozenset({"/health"})
ALLOWED_PREFIXES = ("/v1/",)

_NOT_FOUND = b'{"error":{"message":"not found","type":"not_found_error","code":404}}'


def allowed(path: str) -> bool:
    """Whether a request for `path` may reach vLLM."""
    return path in ALLOWED_PATHS or path.startswith(ALLOWED_PREFIXES)


class AllowlistMiddleware:
    """ASGI middleware: 404 for HTTP requests, close for websockets, outside the allowlist."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = scope.get("type")
        if kind in ("http", "websocket") and not allowed(scope.get("path", "")):
            if kind == "http":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 404,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_NOT_FOUND)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _NOT_FOUND})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)
