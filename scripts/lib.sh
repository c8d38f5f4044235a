# shellcheck shell=bash
# Shared helpers for Jemma's scripts: sourced, never run. Keeps the setup/test/run scripts short and gives
# every stage the same progress and timing lines, which CI logs rely on ("== stage: NAME (12.3 s)").

set -euo pipefail

JEMMA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Everything the scripts download or build lives here (git-ignored), so a fresh clone starts clean and
# `rm -rf .deps` is a full reset. It is not under target/ so that `cargo clean` keeps the slow C builds.
JEMMA_DEPS=${JEMMA_DEPS:-$JEMMA_ROOT/.deps}
JEMMA_VENV=${JEMMA_VENV:-$JEMMA_ROOT/.venv}
# Large tools that do not depend on the checkout (the ~5 GB torch venv of the GGUF converter) live in the user's
# cache, like `cargo install`ed tools, so every clone on a machine (CI's included) shares one copy instead of
# filling the disk with another.
JEMMA_CACHE=${JEMMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jemma}
export JEMMA_ROOT JEMMA_DEPS JEMMA_VENV JEMMA_CACHE
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1;34m[jemma]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[jemma] error:\033[0m %s\n' "$*" >&2; exit 1; }

# stage NAME CMD...: run CMD and print a timing line whatever the outcome, so a failed CI run still shows
# where its time went.
STAGE_SUMMARY=()
stage() {
  local name=$1; shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  log "stage: $name"
  "$@" || rc=$?
  t1=$(date +%s.%N)
  local dt; dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  if [ "$rc" -eq 0 ]; then
    printf '== stage: %-28s %8s s  ok\n' "$name" "$dt" >&2
    STAGE_SUMMARY+=("$(printf '%-28s %8s s  ok' "$name" "$dt")")
  else
    printf '== stage: %-28s %8s s  FAILED (exit %d)\n' "$name" "$dt" "$rc" >&2
    STAGE_SUMMARY+=("$(printf '%-28s %8s s  FAILED' "$name" "$dt")")
    print_summary
    exit "$rc"
  fi
}
# bounded SECS CMD...: run CMD with a deadline. Past it, CMD and everything in its process group get SIGTERM,
# then SIGKILL 30 s later, and the exit status is 124 with a line naming the command, so that one hung step
# fails its stage instead of running into CI's time limit.
bounded() {
  local secs=$1; shift
  local rc=0 t0 fg=()
  t0=$(date +%s)
  # At a terminal, keep the command in the foreground process group so that Ctrl-C and a sudo prompt reach
  # it (timeout then kills only the command itself, not its children).
  [ -t 0 ] && fg=(--foreground)
  timeout "${fg[@]}" -k 30 "$secs" "$@" || rc=$?
  # 137 is also the OOM killer's SIGKILL: only a run that lasted its deadline timed out.
  if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ $(($(date +%s) - t0)) -ge "$secs" ]; then
    printf '\033[1;31m[jemma] error:\033[0m %s exceeded its deadline of %s s and was killed\n' "$*" "$secs" >&2
    return 124
  fi
  return "$rc"
}
print_summary() {
  [ "${#STAGE_SUMMARY[@]}" -gt 0 ] || return 0
  echo "== stage timings ==" >&2
  printf '   %s\n' "${STAGE_SUMMARY[@]}" >&2
}

is_linux_x86_64() { [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; }
is_macos() { [ "$(uname -s)" = Darwin ]; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_ensure PKG...: install the Debian packages that are missing; a no-op (no apt-get update) when all are
# present, which keeps repeated runs fast.
apt_ensure() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get: install them by hand"
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# cargo_install_ensure BIN CRATE VERSION [extra cargo-install args]: install a pinned tool once.
cargo_install_ensure() {
  local bin=$1 crate=$2 version=$3; shift 3
  # `cargo install --list` knows the installed version even for tools without --version (tauri-driver).
  if command -v "$bin" >/dev/null && cargo install --list 2>/dev/null | grep -q "^$crate v$version:"; then return 0; fi
  log "cargo install $crate@$version (one-time, a few minutes on 2 cores)"
  cargo install --quiet --locked "$crate" --version "$version" "$@"
}

venv_python() { echo "$JEMMA_VENV/bin/python"; }

# free_gib DIR: the free space, in whole GiB, of the file system that holds DIR (or its nearest existing parent).
free_gib() {
  local d=$1
  while [ ! -e "$d" ]; do d=$(dirname "$d"); done
  df -Pk "$d" | awk 'NR==2 {printf "%d", $4 / 1048576}'
}

# The GGML_* options llama.cpp is built with for the engine (.cargo/config.toml's [env], written by
# scripts/mlx-linux/setup.sh), as CMake arguments, so that an anchor built from other llama.cpp sources
# (llama-cpp-python) gets the same instruction sets and a comparison measures the code, not the compiler
# flags. GGML_NATIVE stays off: -march=native enables whatever the CPU advertises, and a VM may advertise
# what it does not allow (measured 2026-12-02: AMX's `tilezero` raised SIGILL in a GGML_NATIVE build).
ggml_cmake_args() {
  local args="-DGGML_NATIVE=OFF"
  if [ -f "$JEMMA_ROOT/.cargo/config.toml" ]; then
    args="$args $(sed -n 's/^\(GGML_[A-Z0-9_]*\) = "\(.*\)"$/-D\1=\2/p' "$JEMMA_ROOT/.cargo/config.toml" | tr '\n' ' ')"
  fi
  echo "${args% }"
}

# cached_venv NAME REQ GIB WHAT [PIP_ARG...]: the venv $JEMMA_CACHE/NAME, shared by every clone (a tool's
# own environment, too big to keep once a clone: torch and its CUDA libraries), with the requirements file
# REQ installed (`pip install -r REQ PIP_ARG...`, no wheel cache: it would keep a second copy of torch).
# Rebuilt when REQ changes (its sha256 is kept in the venv), under a lock (two clones or stages must not
# build it over each other); GIB: the free GiB it needs to be built, checked
# first (a disk filled half-way would fail later stages less clearly); WHAT: the log line. A function named
# cached_venv_post, if the caller defines one, runs with the venv's path after the install, before the
# venv counts as built. Prints the venv's path.
cached_venv() {
  local venv=$JEMMA_CACHE/$1 req=$2 gib=$3 what=$4 want lock
  shift 4
  want=$(sha256sum "$req" | cut -d' ' -f1)
  mkdir -p "$JEMMA_CACHE"
  exec {lock}>"$venv.lock"
  flock "$lock"
  if ! [ -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    [ "$(free_gib "$JEMMA_CACHE")" -ge "$gib" ] ||
      die "$what needs $gib GiB free to be built, and $JEMMA_CACHE has $(free_gib "$JEMMA_CACHE")"
    log "$what"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --no-cache-dir -r "$req" "$@" >&2
    if declare -F cached_venv_post >/dev/null; then
      cached_venv_post "$venv"
    fi
    echo "$want" >"$venv/.requirements.sha256"
  fi
  exec {lock}>&-
  echo "$venv"
}

# llama_cpp_sdist: the llama-cpp-python 0.3.36 sdist from PyPI, unpacked once into .deps (its vendored
# llama.cpp is complete: the GGUF converter for the fixtures, llama-server's sources); prints its llama.cpp
# directory. Needs only pip.
llama_cpp_sdist() {
  local version=0.3.36 src tmp
  src=$JEMMA_DEPS/llama-cpp-python-$version
  if ! [ -f "$src/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    log "llama-cpp-python $version sdist (llama.cpp's sources)"
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" >&2
    mkdir -p "$JEMMA_DEPS"
    rm -rf "$src"
    tar xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp"
    mv "$tmp/llama_cpp_python-$version" "$src"
    rm -rf "$tmp"
  fi
  echo "$src/vendor/llama.cpp"
}

# llama_cpp_python_venv [CMAKE_ARG...]: the benchmarks' llama-cpp-python anchor (0.3.36 with its OpenAI
# server), built from source with ggml_cmake_args plus the given arguments (~10 min on 2 cores) and rebuilt
# when they change; prints the venv's path.
llama_cpp_python_venv() {
  local venv=$JEMMA_DEPS/bench-llama-venv args
  args="$(ggml_cmake_args)${*:+ $*}"
  if [ "$(cat "$venv/.cmake-args" 2>/dev/null)" != "$args" ] ||
    ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    log "building llama-cpp-python[server] 0.3.36 ($args; ~10 min on 2 cores)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy >&2
    # No wheel cache: a wheel built with other CMake arguments would be reused.
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" install -q --no-cache-dir \
      --no-binary llama-cpp-python 'llama-cpp-python[server]==0.3.36' >&2
    echo "$args" >"$venv/.cmake-args"
  fi
  echo "$venv"
}

# The tiers of the app's test configs: fast on the tiny fixture, primary on $1, and a heavy tier that is
# configured but off (the app lists it; nothing is contacted: port 9 is discard).
app_tiers() {
  cat <<TOML
[tiers.fast]
model = "$JEMMA_ROOT/fixtures/tiny"
[tiers.primary]
model = "$1"
[tiers.heavy]
kind = "openai"
url = "http://127.0.0.1:9"
model = "gemma-4-26b-a4b"
enabled = false
TOML
}
