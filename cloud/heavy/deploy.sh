#!/usr/bin/env bash
# Builds the heavy tier's image with Cloud Build, deploys it to Cloud Run with an L4 GPU, stores a fresh
# bearer key in Secret Manager, and prints the URL and how to point the Mac gateway at it.
#   PROJECT=my-project REGION=europe-west4 cloud/heavy/deploy.sh
# Needs: gcloud (authenticated), a project with Cloud Run GPU quota in REGION (L4: e.g. us-central1,
# europe-west4), and the Cloud Build, Artifact Registry, Secret Manager and Cloud Run APIs enabled.
set -euo pipefail
PROJECT=${PROJECT:?set PROJECT to your Google Cloud project id}
REGION=${REGION:-us-central1}
SERVICE=${SERVICE:-jemma-heavy}
REPO=${REPO:-jemma}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPO/$SERVICE:$(git -C "$ROOT" rev-parse --short HEAD)"

gcloud config set project "$PROJECT" >/dev/null
gcloud services enable run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com \
  secretmanager.googleapis.com >/dev/null
gcloud artifacts repositories describe "$REPO" --location "$REGION" >/dev/null 2>&1 ||
  gcloud artifacts repositories create "$REPO" --repository-format docker --location "$REGION"

echo "building $IMAGE (CUDA + llama.cpp: ~25 min on Cloud Build's default machine)"
cat >"$ROOT/.cloudbuild.yaml" <<YAML
steps:
  - name: gcr.io/cloud-builders/docker
    args: ["build", "-f", "cloud/heavy/Dockerfile", "-t", "$IMAGE", "."]
images: ["$IMAGE"]
timeout: 5400s
options:
  machineType: E2_HIGHCPU_32
YAML
trap 'rm -f "$ROOT/.cloudbuild.yaml"' EXIT
gcloud builds submit "$ROOT" --config "$ROOT/.cloudbuild.yaml"

# The bearer key: generated here, kept only in Secret Manager (and printed once for the Mac's keychain).
# shellcheck source=cloud/heavy/secret.sh
. "$ROOT/cloud/heavy/secret.sh"
ensure_key_secret "$PROJECT"

sed -e "s|IMAGE|$IMAGE|" -e "s|REGION|$REGION|" "$ROOT/cloud/heavy/service.yaml" >"$ROOT/.service.yaml"
trap 'rm -f "$ROOT/.cloudbuild.yaml" "$ROOT/.service.yaml"' EXIT
gcloud run services replace "$ROOT/.service.yaml" --region "$REGION"
# The service authenticates callers itself (bearer key), so Cloud Run lets requests through.
gcloud run services add-iam-policy-binding "$SERVICE" --region "$REGION" --member allUsers \
  --role roles/run.invoker >/dev/null

URL=$(gcloud run services describe "$SERVICE" --region "$REGION" --format 'value(status.url)')
echo
echo "heavy tier: $URL"
if [ "$NEW_KEY" = 1 ]; then
  echo "API key (stored in Secret Manager as jemma-heavy-api-key; shown once): $KEY"
fi
echo "On the Mac: Jemma → Settings → Heavy tier URL = $URL/v1 and paste the key (kept in the keychain),"
echo "or in jemma.toml: [tiers.heavy] kind = \"openai\", url = \"$URL/v1\", api_key = \"keyring:ai.jemma/heavy_api_key\""
