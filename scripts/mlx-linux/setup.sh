#!/usr/bin/env bash
# MLX on Linux x86_64 (CPU backend) for mlx-rs, so the exact engine code that runs on Metal on a Mac is
# compiled and tested here.
#
# mlx-sys's own build script clones MLX from GitHub and builds it with CMake, which cannot work offline and
# would take far longer than CI allows. Instead:
#   1. take the prebuilt CPU-only libmlx (+ headers and CMake config) from PyPI's `mlx-cpu` wheel, pinned to the
#      MLX version that mlx-sys's bundled mlx-c expects;
#   2. build that bundled mlx-c (read from cargo's registry copy of mlx-sys) against it, statically;
#   3. generate the Rust bindings with bindgen, with the same options as mlx-sys's build script;
#   4. build a tiny stand-in for the one Darwin symbol mlx-rs references (mach_approximate_time);
#   5. write a cargo build-script override for `links = "mlx"` on x86_64-unknown-linux-gnu only, into the
#      git-ignored .cargo/config.toml. A Mac never runs this and builds mlx-sys the normal way, with Metal.
#
# Idempotent: each step is skipped when its output is already there for the pinned version.
# Usage: scripts/mlx-linux/setup.sh            (uses JEMMA_DEPS, default .deps/)
. "$(dirname "$0")/../lib.sh"

HERE="$JEMMA_ROOT/scripts/mlx-linux"
MLX_VERSION=0.32.2   # must equal the MLX tag pinned by mlx-sys's bundled mlx-c (checked below)
MLXSYS_VERSION=0.7.0 # the mlx-sys that mlx-rs 0.33 depends on (checked below)
PREFIX="$JEMMA_DEPS/mlx-linux-$MLX_VERSION"
mkdir -p "$PREFIX"

is_linux_x86_64 || die "MLX-on-Linux setup is for x86_64 Linux only (a Mac builds mlx-sys natively)"

# 1. mlx-sys source as cargo downloaded it (read only; nothing is written there)
cargo fetch --manifest-path "$JEMMA_ROOT/Cargo.toml" -q
MLXSYS=$(cargo metadata --manifest-path "$JEMMA_ROOT/Cargo.toml" --format-version 1 --filter-platform x86_64-unknown-linux-gnu |
  python3 -c '
import json, sys
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "mlx-sys"][0]
print(p["version"], p["manifest_path"].rsplit("/", 1)[0])')
read -r found_version MLXSYS <<<"$MLXSYS"
[ "$found_version" = "$MLXSYS_VERSION" ] || die "mlx-sys is $found_version, this script is pinned to $MLXSYS_VERSION: update MLX_VERSION/MLXSYS_VERSION together"
MLXC="$MLXSYS/src/mlx-c"
grep -q "GIT_TAG v$MLX_VERSION)" "$MLXC/CMakeLists.txt" || die "mlx-c in mlx-sys $found_version does not pin MLX $MLX_VERSION"

# 2. prebuilt CPU-only libmlx from PyPI (kept in the wheel's layout: libmlx.so's RPATH expects it)
if [ ! -f "$PREFIX/mlx-cpu/mlx/lib/libmlx.so" ]; then
  log "downloading mlx-cpu==$MLX_VERSION wheel"
  python3 -m pip download -q --no-deps "mlx-cpu==$MLX_VERSION" -d "$PREFIX/wheels"
  rm -rf "$PREFIX/mlx-cpu"
  python3 -m zipfile -e "$PREFIX"/wheels/mlx_cpu-$MLX_VERSION-*.whl "$PREFIX/mlx-cpu"
fi

# 3. mlx-c, static, out of tree
if [ ! -f "$PREFIX/mlxc/lib/libmlxc.a" ]; then
  log "building mlx-c against libmlx (about 2 min on 2 cores)"
  cmake -S "$MLXC" -B "$PREFIX/build-mlxc" -DCMAKE_BUILD_TYPE=Release \
    -DMLX_C_USE_SYSTEM_MLX=ON -DMLX_DIR="$PREFIX/mlx-cpu/mlx/share/cmake/MLX" \
    -DMLX_C_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_INSTALL_PREFIX="$PREFIX/mlxc" \
    "-DCMAKE_CXX_FLAGS=-include $HERE/mlxc_linux_compat.h" >"$PREFIX/cmake-configure.log"
  nice cmake --build "$PREFIX/build-mlxc" -j"$(nproc)" >"$PREFIX/cmake-build.log"
  cmake --install "$PREFIX/build-mlxc" >/dev/null
fi

# 4. bindings.rs with the options of mlx-sys's bindgen_config.rs
if [ ! -s "$PREFIX/gen/bindings.rs" ]; then
  log "generating mlx-c bindings"
  mkdir -p "$PREFIX/gen"
  (cd "$MLXC" && for h in $(find mlx/c -maxdepth 1 -name '*.h' | LC_ALL=C sort); do echo "#include \"$h\""; done) >"$PREFIX/gen/mlx_c_all.h"
  bindgen "$PREFIX/gen/mlx_c_all.h" --rust-target 1.73.0 \
    --blocklist-function malloc --blocklist-function realloc -o "$PREFIX/gen/bindings.rs.tmp" \
    -- -I"$MLXC" -include "$HERE/mlxc_linux_compat.h"
  mv "$PREFIX/gen/bindings.rs.tmp" "$PREFIX/gen/bindings.rs"
fi

# 5. the Darwin time symbol mlx-rs's RandomState references
if [ ! -f "$PREFIX/shim/libmlx_linux_shim.a" ]; then
  mkdir -p "$PREFIX/shim"
  cc -O2 -fPIC -c "$HERE/mach_time_shim.c" -o "$PREFIX/shim/mach_time_shim.o"
  ar rcs "$PREFIX/shim/libmlx_linux_shim.a" "$PREFIX/shim/mach_time_shim.o"
fi

# 6. cargo config (git-ignored): the override applies to this target only, so the same sources build
#    unchanged on macOS. The rpath lets test binaries and `jemma` find libmlx.so without LD_LIBRARY_PATH.
#    The [env] section builds llama.cpp (llama-cpp-sys-2 forwards GGML_* variables to CMake) for this
#    machine's CPU: llama-cpp-sys-2 turns GGML_NATIVE off unless rustc targets `native`, which left the
#    AVX2/FMA kernels out (measured here: 22 instead of 31 prompt tok/s). Only the features /proc/cpuinfo
#    lists are enabled, so the build runs where it was made; a portable release build would drop them.
GGML_ENV=""
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
for pair in avx:GGML_AVX avx2:GGML_AVX2 fma:GGML_FMA f16c:GGML_F16C bmi2:GGML_BMI2 sse4_2:GGML_SSE42 avx512f:GGML_AVX512; do
  case " $flags " in *" ${pair%%:*} "*) GGML_ENV="$GGML_ENV${pair#*:} = \"ON\"
" ;; esac
done
mkdir -p "$JEMMA_ROOT/.cargo"
cat >"$JEMMA_ROOT/.cargo/config.toml.tmp" <<TOML
# Generated by scripts/mlx-linux/setup.sh: do not edit, do not commit (.gitignore).
# Replaces mlx-sys's build script on Linux x86_64 with MLX's CPU backend (pip mlx-cpu==$MLX_VERSION).
[target.x86_64-unknown-linux-gnu.mlx]
rustc-link-search = ["native=$PREFIX/mlxc/lib", "native=$PREFIX/mlx-cpu/mlx/lib", "native=$PREFIX/shim"]
rustc-link-lib = ["static=mlxc", "static=mlx_linux_shim", "dylib=mlx", "dylib=stdc++"]
rustc-env = { OUT_DIR = "$PREFIX/gen" }

[target.x86_64-unknown-linux-gnu]
rustflags = ["-C", "link-arg=-Wl,-rpath,$PREFIX/mlx-cpu/mlx/lib"]

[env]
CMAKE_BUILD_PARALLEL_LEVEL = "$(nproc)"
$GGML_ENV
TOML
if ! cmp -s "$JEMMA_ROOT/.cargo/config.toml.tmp" "$JEMMA_ROOT/.cargo/config.toml" 2>/dev/null; then
  mv "$JEMMA_ROOT/.cargo/config.toml.tmp" "$JEMMA_ROOT/.cargo/config.toml"
  log "wrote .cargo/config.toml (MLX CPU override for x86_64-unknown-linux-gnu)"
else
  rm "$JEMMA_ROOT/.cargo/config.toml.tmp"
fi
