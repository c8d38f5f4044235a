#!/usr/bin/env bash
# The Python venv for tests, fixtures and benchmarks (never used at run time). Reinstalls only when
# scripts/requirements.txt or scripts/requirements-nodeps.txt changed since the last successful install.
. "$(dirname "$0")/lib.sh"
REQ="$JEMMA_ROOT/scripts/requirements.txt"
NODEPS="$JEMMA_ROOT/scripts/requirements-nodeps.txt"
STAMP="$JEMMA_VENV/.requirements.sha256"
want=$(cat "$REQ" "$NODEPS" | sha256sum | cut -d' ' -f1)
if [ -x "$JEMMA_VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x "$JEMMA_VENV/bin/python" ] || python3 -m venv "$JEMMA_VENV"
log "pip install -r scripts/requirements.txt (first time: a few minutes)"
"$JEMMA_VENV/bin/python" -m pip install -q --upgrade pip
"$JEMMA_VENV/bin/python" -m pip install -q -r "$REQ"
"$JEMMA_VENV/bin/python" -m pip install -q --no-deps -r "$NODEPS"
echo "$want" >"$STAMP"
