# shellcheck shell=bash
# Sourced by cloud/heavy/deploy.sh and cloud/heavy/vllm/deploy.sh: both variants of the heavy tier take their
# bearer key from one Secret Manager secret, jemma-heavy-api-key.
#   ensure_key_secret PROJECT
# creates the secret with a fresh key when it is missing (then NEW_KEY=1 and KEY holds the key, to print
# once for the Mac's keychain; else NEW_KEY=0), and lets the project's default compute service account read it.
# KEY and NEW_KEY are read by the script that sources this file.
# shellcheck disable=SC2034
ensure_key_secret() {
  local project=$1 sa
  if ! gcloud secrets describe jemma-heavy-api-key >/dev/null 2>&1; then
    KEY="jm-$(openssl rand -hex 32)"
    printf '%s' "$KEY" | gcloud secrets create jemma-heavy-api-key --data-file=- --replication-policy automatic
    NEW_KEY=1
  else
    NEW_KEY=0
  fi
  sa=$(gcloud projects describe "$project" --format 'value(projectNumber)')-compute@developer.gserviceaccount.com
  gcloud secrets add-iam-policy-binding jemma-heavy-api-key --member "serviceAccount:$sa" \
    --role roles/secretmanager.secretAccessor >/dev/null
}
