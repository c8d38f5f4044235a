#!/usr/bin/env bash
# The GGUF converter for test fixtures: llama.cpp's convert_hf_to_gguf.py + gguf-py as vendored in the
# llama-cpp-python sdist on PyPI (the llama-cpp-sys-2 crate ships only a stub converter, and PyPI's `gguf` is
# too old for Gemma 4), in its own venv with torch. Prints the converter's directory; sets nothing else.
# Idempotent. The venv's python is "$JEMMA_CACHE/gguf-venv/bin/python".
. "$(dirname "$0")/lib.sh"
# The venv is shared by every clone (JEMMA_CACHE): it depends only on gguf-requirements.txt, checked below.
VENV=$JEMMA_CACHE/gguf-venv
REQ=$JEMMA_ROOT/scripts/gguf-requirements.txt
want=$(sha256sum "$REQ" | cut -d' ' -f1)
mkdir -p "$JEMMA_CACHE"
# Two clones setting up at once must not build the shared venv over each other.
exec 9>"$JEMMA_CACHE/gguf-venv.lock"
flock 9
if ! [ -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  log "GGUF converter venv (torch, transformers; first time: ~2 min, ~5 GB)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # --no-cache-dir: pip's wheel cache would keep a second ~4 GB copy of torch and its CUDA libraries.
  "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --no-cache-dir -r "$REQ" >&2
  echo "$want" >"$VENV/.requirements.sha256"
fi
llama_cpp_sdist
