#!/bin/sh
# Container entrypoint: picks the model from the environment and runs the heavy tier's server.
#   MODEL_URL                  https://… or gs://bucket/object of a GGUF (downloaded at start), or
#   HF_REPO + HF_FILE (+HF_TOKEN) a GGUF on Hugging Face (default: the catalog's 26B-A4B UD-Q4_K_XL)
#   MODEL_PATH                 a GGUF already on disk (e.g. a Cloud Storage volume mount)
#   HEAVY_API_KEY              the bearer key callers must send (required)
#   PORT                       set by Cloud Run
set -eu
if [ -n "${MODEL_PATH:-}" ]; then
  JEMMA_HEAVY_MODEL=$MODEL_PATH
elif [ -n "${MODEL_URL:-}" ]; then
  JEMMA_HEAVY_MODEL=$MODEL_URL
elif [ -n "${HF_REPO:-}" ]; then
  JEMMA_HEAVY_MODEL="$HF_REPO/${HF_FILE:?HF_FILE is required with HF_REPO}"
fi
if [ -z "${HEAVY_API_KEY:-}" ]; then
  echo "HEAVY_API_KEY is not set: refusing to serve without a key" >&2
  exit 1
fi
export JEMMA_HEAVY_MODEL JEMMA_PORT="${PORT:-8080}"
exec jemma serve --config /etc/jemma/jemma.toml
