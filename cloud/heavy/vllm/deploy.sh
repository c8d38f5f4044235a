#!/usr/bin/env bash
# Builds the heavy tier's vLLM image with Cloud Build (vLLM's prebuilt image plus two small files), deploys it
# to Cloud Run on RTX PRO 6000 GPUs with autoscaling, reuses (or creates) the bearer key in Secret Manager, and
# prints the URL and the jemma.toml pool endpoint to point the gateway at it.
#   PROJECT=my-project REGION=us-central1 cloud/heavy/vllm/deploy.sh
#   MODEL=gs://bucket/gemma-4-26B-A4B-it ... to stream the weights from Cloud Storage (see README.md)
# Needs: gcloud (authenticated), Cloud Run RTX PRO 6000 GPU quota in REGION (e.g. us-central1, europe-west4,
# asia-southeast1) for maxScale instances, and the Cloud Build, Artifact Registry, Secret Manager and Cloud Run
# APIs enabled.
set -euo pipefail
PROJECT=${PROJECT:?set PROJECT to your Google Cloud project id}
REGION=${REGION:-us-central1}
SERVICE=${SERVICE:-jemma-heavy-vllm}
REPO=${REPO:-jemma}
MODEL=${MODEL:-}
DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$DIR/../../.." && pwd)
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPO/$SERVICE:$(git -C "$ROOT" rev-parse --short HEAD)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

gcloud config set project "$PROJECT" >/dev/null
gcloud services enable run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com \
  secretmanager.googleapis.com >/dev/null
gcloud artifacts repositories describe "$REPO" --location "$REGION" >/dev/null 2>&1 ||
  gcloud artifacts repositories create "$REPO" --repository-format docker --location "$REGION"

# The build context is this folder alone (Dockerfile, entrypoint, allowlist): nothing is compiled, most of the
# time goes to pulling vLLM's image and pushing it to Artifact Registry.
echo "building $IMAGE (vllm/vllm-openai + entrypoint: a few minutes on Cloud Build)"
gcloud builds submit "$DIR" --tag "$IMAGE" --timeout 3600s

# The bearer key: the same Secret Manager secret as the llama.cpp variant, created here if it is missing
# (and then printed once for the Mac's keychain).
# shellcheck source=cloud/heavy/secret.sh
. "$DIR/../secret.sh"
ensure_key_secret "$PROJECT"

sed -e "s|image: IMAGE\$|image: $IMAGE|" -e "s|location: REGION\$|location: $REGION|" \
  -e "s|^  name: jemma-heavy-vllm\$|  name: $SERVICE|" \
  "$DIR/service.yaml" >"$TMP/service.yaml"
if [ -n "$MODEL" ]; then
  sed -i -e "s|value: google/gemma-4-26B-A4B-it\$|value: $MODEL|" "$TMP/service.yaml"
fi
gcloud run services replace "$TMP/service.yaml" --region "$REGION"
# vLLM checks the bearer key itself (and jemma_allowlist closes the routes it does not check), so Cloud Run
# lets requests through.
gcloud run services add-iam-policy-binding "$SERVICE" --region "$REGION" --member allUsers \
  --role roles/run.invoker >/dev/null

URL=$(gcloud run services describe "$SERVICE" --region "$REGION" --format 'value(status.url)')
# Cloud Run balances the instances behind the one URL: for Jemma it is one endpoint that runs
# maxScale × containerConcurrency requests at once.
MAX_SCALE=$(sed -n 's|^ *autoscaling.knative.dev/maxScale: *"\([0-9]*\)".*|\1|p' "$TMP/service.yaml")
PER_INSTANCE=$(sed -n 's|^ *containerConcurrency: *\([0-9]*\).*|\1|p' "$TMP/service.yaml")
echo
echo "heavy tier (vLLM): $URL"
if [ "$NEW_KEY" = 1 ]; then
  echo "API key (stored in Secret Manager as jemma-heavy-api-key; shown once): $KEY"
fi
echo "On the Mac, keep the key in the keychain as ai.jemma/heavy_api_key (Settings → heavy API key) and add"
echo "to jemma.toml:"
cat <<TOML

[tiers.heavy]
enabled = false                    # the tray's heavy toggle turns it on
first_token_timeout_secs = 900.0   # a cold start downloads and loads the model; Cloud Run's request timeout
                                   # (timeoutSeconds: 900 in service.yaml) ends any longer wait
[[tiers.heavy.endpoints]]
kind = "openai"
url = "$URL/v1"
model = "gemma-4-26b-a4b"
api_key = "keyring:ai.jemma/heavy_api_key"
max_concurrency = $((MAX_SCALE * PER_INSTANCE))   # $MAX_SCALE instances × $PER_INSTANCE sequences
probe = false   # a probe is a request: it would keep an instance up (and billed); answers judge it instead
TOML
