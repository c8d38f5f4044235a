#!/usr/bin/env bash
# Type-checks the whole workspace for aarch64-apple-darwin on Linux so that macOS-only code (Metal engine
# features, tray template icons, LaunchAgent handling, keychain) cannot rot unseen.
# Usage: scripts/macos-check/check.sh [extra cargo args]   e.g. `clippy -- -D warnings` is run by scripts/test
. "$(dirname "$0")/../lib.sh"

HERE="$JEMMA_ROOT/scripts/macos-check"
OUT="$JEMMA_DEPS/macos-check"
mkdir -p "$OUT/gen" "$OUT/empty-sysroot"
rustup target list --installed | grep -qx aarch64-apple-darwin || rustup target add aarch64-apple-darwin

cargo fetch --manifest-path "$JEMMA_ROOT/Cargo.toml" -q
MLXC=$(cargo metadata --manifest-path "$JEMMA_ROOT/Cargo.toml" --format-version 1 --filter-platform aarch64-apple-darwin |
  python3 -c '
import json, sys
m = json.load(sys.stdin)
print([p for p in m["packages"] if p["name"] == "mlx-sys"][0]["manifest_path"].rsplit("/", 1)[0] + "/src/mlx-c")')

# mlx-c bindings for the Apple target, with stand-ins for the three SDK headers mlx-c includes
if [ ! -s "$OUT/gen/bindings.rs" ] || [ "$MLXC" != "$(cat "$OUT/gen/.source" 2>/dev/null)" ]; then
  log "generating mlx-c bindings for aarch64-apple-darwin"
  for h in $(find "$MLXC/mlx/c" -maxdepth 1 -name '*.h' | LC_ALL=C sort); do echo "#include \"$h\""; done >"$OUT/gen/all.h"
  bindgen "$OUT/gen/all.h" --rust-target 1.73.0 --blocklist-function malloc --blocklist-function realloc \
    -o "$OUT/gen/bindings.rs" -- \
    -I"$MLXC" --target=aarch64-apple-darwin \
    -isysroot "$OUT/empty-sysroot" -isystem "$HERE/stub-include" \
    -Xclang -target-feature -Xclang +bf16
  echo "$MLXC" >"$OUT/gen/.source"
fi
sed "s|@MLX_OUT@|$OUT/gen|" "$HERE/overrides.toml.in" >"$OUT/overrides.toml"

# A separate target dir keeps these check artefacts from invalidating the host build's. The llama.cpp engine
# crate is left out: on Apple Silicon it is opt-in (MLX on Metal is the engine), its build script compiles
# llama.cpp with CMake for the target, and it has no macOS-specific code to check.
sub=${1:-check}; shift || true
exec cargo "$sub" --config "$OUT/overrides.toml" --workspace --exclude jemma-engine-llama --all-targets \
  --target aarch64-apple-darwin \
  --target-dir "$JEMMA_ROOT/target/macos-check" "$@"
