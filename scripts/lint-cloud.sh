#!/usr/bin/env bash
# Checks the heavy tier's Cloud Run assets without Docker or GCP (neither exists on CI machines): shellcheck
# on the scripts, hadolint on the Dockerfiles, each service.yaml parsed and its key settings asserted, for the
# llama.cpp variant (cloud/heavy/) and the vLLM one (cloud/heavy/vllm/). The llama.cpp server config
# (cloud/heavy/jemma.toml) is parsed and served by tests/e2e (heavy.rs).
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
command -v shellcheck >/dev/null || apt_ensure shellcheck
# -x: the deploy scripts source cloud/heavy/secret.sh (named from the repository root in their directives).
shellcheck -x cloud/heavy/deploy.sh cloud/heavy/entrypoint.sh cloud/heavy/secret.sh \
  cloud/heavy/vllm/deploy.sh cloud/heavy/vllm/entrypoint.sh
PY=$(venv_python)
"$(dirname "$PY")/hadolint" --config cloud/heavy/.hadolint.yaml cloud/heavy/Dockerfile \
  cloud/heavy/vllm/Dockerfile
"$PY" - <<'PYEOF'
import yaml
s = yaml.safe_load(open("cloud/heavy/service.yaml"))
t = s["spec"]["template"]
a = t["metadata"]["annotations"]
c = t["spec"]["containers"][0]
assert s["kind"] == "Service" and s["apiVersion"] == "serving.knative.dev/v1"
assert a["autoscaling.knative.dev/minScale"] == "0" and a["autoscaling.knative.dev/maxScale"] == "1"
assert t["spec"]["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-l4"
assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
p = c["startupProbe"]
assert p["httpGet"]["path"] == "/health" and p["periodSeconds"] * p["failureThreshold"] >= 600
env = {e["name"]: e for e in c["env"]}
assert env["HEAVY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "jemma-heavy-api-key"
print("service.yaml ok")
PYEOF

# The vLLM variant: service.yaml against the flags the entrypoint gives vLLM.
"$PY" - <<'PYEOF'
import shlex
import yaml
s = yaml.safe_load(open("cloud/heavy/vllm/service.yaml"))
t = s["spec"]["template"]
a = t["metadata"]["annotations"]
c = t["spec"]["containers"][0]
assert s["kind"] == "Service" and s["apiVersion"] == "serving.knative.dev/v1"
assert a["autoscaling.knative.dev/minScale"] == "0"
assert int(a["autoscaling.knative.dev/maxScale"]) > 1, "the vLLM variant scales to several instances"
assert t["spec"]["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-rtx-pro-6000"
lim = c["resources"]["limits"]
assert lim["nvidia.com/gpu"] == "1"
assert int(lim["cpu"]) >= 20 and int(lim["memory"].removesuffix("Gi")) >= 80, "RTX PRO 6000 minimums"
# The vLLM command line, as the entrypoint builds it (comments dropped).
src = open("cloud/heavy/vllm/entrypoint.sh").read() + open("cloud/heavy/vllm/Dockerfile").read()
words = shlex.split("\n".join(l.split(" #")[0] for l in src.splitlines() if not l.lstrip().startswith("#")))
def flag(name):
    vals = [words[i + 1] for i, w in enumerate(words) if w == name]
    assert len(vals) == 1, f"{name} given {len(vals)} times"
    return vals[0]
assert t["spec"]["containerConcurrency"] == int(flag("--max-num-seqs")), "containerConcurrency != max-num-seqs"
assert flag("--served-model-name") == "gemma-4-26b-a4b"
assert flag("--port") == "${PORT:-8080}" and c["ports"][0]["containerPort"] == 8080
assert flag("--reasoning-parser") == "gemma4" and flag("--tool-call-parser") == "gemma4"
assert flag("--middleware") == "jemma_allowlist.AllowlistMiddleware"
assert "--api-key" not in words and "VLLM_API_KEY=$HEAVY_API_KEY" in words, "key via VLLM_API_KEY only"
p = c["startupProbe"]
window = p["periodSeconds"] * p["failureThreshold"]
assert p["httpGet"]["path"] == "/health" and p["httpGet"]["port"] == 8080
assert p.get("initialDelaySeconds", 0) + window >= 1200 and window <= 1800, "startup probe window"
env = {e["name"]: e for e in c["env"]}
assert env["HEAVY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "jemma-heavy-api-key"
print("vllm/service.yaml ok")
PYEOF
# The route allowlist in front of vLLM: only /v1/... and /health pass.
"$PY" - <<'PYEOF'
import asyncio, sys
sys.path.insert(0, "cloud/heavy/vllm")
from jemma_allowlist import AllowlistMiddleware
async def check(kind, path):
    seen, sent = [], []
    async def app(scope, receive, send):
        seen.append(scope["type"])
    async def send(m):
        sent.append(m)
    await AllowlistMiddleware(app)({"type": kind, "path": path}, None, send)
    return bool(seen), sent
async def main():
    for path in ["/v1/chat/completions", "/v1/models", "/v1/completions", "/health"]:
        passed, _ = await check("http", path)
        assert passed, path
    for path in ["/invocations", "/pause", "/tokenize", "/metrics", "/update_weights", "/v1", "/", "/docs"]:
        passed, sent = await check("http", path)
        assert not passed and sent[0]["status"] == 404, path
    passed, sent = await check("websocket", "/pause")
    assert not passed and sent[0]["type"] == "websocket.close"
    assert (await check("lifespan", ""))[0]
asyncio.run(main())
print("jemma_allowlist ok")
PYEOF
# The entrypoint refuses to start without a key, and hands vLLM $PORT (a stand-in vllm prints its arguments).
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
printf '#!/bin/sh\necho "$@"\n' >"$fake/vllm"
chmod +x "$fake/vllm"
if PATH="$fake:$PATH" env -u HEAVY_API_KEY sh cloud/heavy/vllm/entrypoint.sh >/dev/null 2>&1; then
  die "cloud/heavy/vllm/entrypoint.sh started without HEAVY_API_KEY"
fi
args=$(PATH="$fake:$PATH" HEAVY_API_KEY=k PORT=9123 MODEL=gs://b/m sh cloud/heavy/vllm/entrypoint.sh)
case $args in
  "serve gs://b/m "*"--port 9123 "*"--load-format runai_streamer") ;;
  *) die "unexpected vllm arguments: $args" ;;
esac
log "cloud/heavy (llama.cpp and vLLM): shellcheck, hadolint, service.yaml and entrypoint checks passed"
