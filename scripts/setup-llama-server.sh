#!/usr/bin/env bash
# llama.cpp's own OpenAI-compatible server, llama-server, as a real upstream for the heavy tier's tests
# (tests/e2e/llama_server.rs: Jemma speaks its dialect, learned from its /v1/models) and as the serving
# benchmark's anchor (scripts/bench-serving: its --parallel slots and prompt cache are what a llama.cpp user
# runs). Built from the llama.cpp that the llama-cpp-python 0.3.36 sdist on PyPI vendors (the
# llama-cpp-sys-2 crate vendors llama.cpp without the server's sources; no other registry this project
# reaches has llama-server), with the engine's GGML flags (ggml_cmake_args), without its web UI (fetched
# from the Hub otherwise) or TLS. 3-7 min on 2 cores the first time on a machine: like the GGUF converter's
# venv it lives in the user's cache (JEMMA_CACHE), shared by every clone (the flags are the machine's);
# rebuilt when the flags change. Prints the binary's path. Idempotent.
. "$(dirname "$0")/lib.sh"
OUT=$JEMMA_CACHE/llama-server-0.3.36
BIN=$OUT/bin/llama-server
args="$(ggml_cmake_args) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
mkdir -p "$JEMMA_CACHE"
# Two clones or stages building at once must not write one build directory together.
exec 8>"$JEMMA_CACHE/llama-server.lock"
flock 8
if [ -x "$BIN" ] && [ "$(cat "$OUT/.cmake-args" 2>/dev/null)" = "$args" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi
SRC=$(llama_cpp_sdist)
log "building llama-server from llama-cpp-python 0.3.36's llama.cpp (3-7 min on 2 cores)"
rm -rf "$OUT"
mkdir -p "$OUT/bin"
# shellcheck disable=SC2086 # $args is a list of -D flags
cmake -S "$SRC" -B "$OUT/build" $args >"$OUT/configure.log" 2>&1 ||
  { tail -20 "$OUT/configure.log" >&2; die "configuring llama-server failed (log: $OUT/configure.log)"; }
cmake --build "$OUT/build" --target llama-server -j "$(nproc)" >"$OUT/build.log" 2>&1 ||
  { tail -20 "$OUT/build.log" >&2; die "building llama-server failed (log: $OUT/build.log)"; }
cp "$OUT/build/bin/llama-server" "$BIN"
# The objects (~200 MB) are not needed once the binary is out.
rm -rf "$OUT/build"
echo "$args" >"$OUT/.cmake-args"
echo "$BIN"
