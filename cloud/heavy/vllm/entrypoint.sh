#!/bin/sh
# Container entrypoint of the heavy tier's vLLM variant: checks the key, then runs vLLM's OpenAI server.
#   HEAVY_API_KEY  the bearer key callers must send (required; Secret Manager, as for cloud/heavy/)
#   MODEL          a Hugging Face repo (default google/gemma-4-26B-A4B-it, downloaded at start; HF_TOKEN is
#                  read by huggingface_hub if the repo needs one), or gs://bucket/dir holding the same
#                  files, streamed into the GPU with vLLM's Run:ai loader as Google's Cloud Run codelab does
#   PORT           set by Cloud Run (default 8080)
set -eu
if [ -z "${HEAVY_API_KEY:-}" ]; then
  echo "HEAVY_API_KEY is not set: refusing to serve without a key" >&2
  exit 1
fi
# VLLM_API_KEY is the environment form of --api-key (vLLM requires `Authorization: Bearer <key>` on /v1/...).
# Passed this way rather than on the command line because vLLM logs its non-default arguments at start, and
# releases before the redaction of api_key would write the key to Cloud Logging.
VLLM_API_KEY=$HEAVY_API_KEY
export VLLM_API_KEY
# The key guards /v1/... only: jemma_allowlist answers 404 to every other route (see that file).
export PYTHONPATH="/opt/jemma${PYTHONPATH:+:$PYTHONPATH}"

MODEL=${MODEL:-google/gemma-4-26B-A4B-it}
# --max-num-seqs: sequences decoded together, which must equal containerConcurrency in service.yaml
# (scripts/lint-cloud.sh checks), so that Cloud Run starts another instance rather than queue in this one.
# --max-model-len 32768: the llama.cpp variant's context; 16 such sequences' KV cache fits next to the
# ~52 GB of BF16 weights in the 96 GB (vLLM caps the batch by KV space anyway).
# Parsers, tool choice, prefix caching, chunked prefill, generation config: as in Google's Gemma 4 + vLLM
# codelab for Cloud Run and GKE tutorial.
set -- "$MODEL" \
  --served-model-name gemma-4-26b-a4b \
  --host 0.0.0.0 \
  --port "${PORT:-8080}" \
  --middleware jemma_allowlist.AllowlistMiddleware \
  --dtype bfloat16 \
  --max-model-len 32768 \
  --max-num-seqs 16 \
  --gpu-memory-utilization 0.90 \
  --enable-chunked-prefill \
  --enable-prefix-caching \
  --generation-config auto \
  --enable-auto-tool-choice \
  --tool-call-parser gemma4 \
  --reasoning-parser gemma4
case $MODEL in
  gs://*) set -- "$@" --load-format runai_streamer ;;
esac
exec vllm serve "$@"
