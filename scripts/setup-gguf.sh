#!/usr/bin/env bash
# The GGUF converter for test fixtures: llama.cpp's convert_hf_to_gguf.py + gguf-py as vendored in the
# llama-cpp-python sdist on PyPI (the llama-cpp-sys-2 crate ships only a stub converter, and PyPI's `gguf` is
# too old for Gemma 4), in its own venv with torch. Prints the converter's directory; sets nothing else.
# Idempotent. The venv's python is "$JEMMA_CACHE/gguf-venv/bin/python".
. "$(dirname "$0")/lib.sh"
# The venv depends only on gguf-requirements.txt; shared by every clone (JEMMA_CACHE).
cached_venv gguf-venv "$JEMMA_ROOT/scripts/gguf-requirements.txt" 8 \
  "GGUF converter venv (torch, transformers; first time: ~2 min, ~5 GB)" >/dev/null
llama_cpp_sdist
