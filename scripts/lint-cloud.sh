#!/usr/bin/env bash
# Checks the heavy tier's Cloud Run assets without Docker or GCP (neither exists on CI machines): shellcheck
# on the scripts, hadolint on the Dockerfile, service.yaml parsed and its key settings asserted. The server
# config (cloud/heavy/jemma.toml) is parsed and served by tests/e2e (heavy.rs).
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
command -v shellcheck >/dev/null || apt_ensure shellcheck
shellcheck cloud/heavy/deploy.sh cloud/heavy/entrypoint.sh
PY=$(venv_python)
"$(dirname "$PY")/hadolint" --config cloud/heavy/.hadolint.yaml cloud/heavy/Dockerfile
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
log "cloud/heavy: shellcheck, hadolint and service.yaml checks passed"
