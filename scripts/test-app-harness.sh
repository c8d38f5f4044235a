#!/usr/bin/env bash
# Tests the app E2E's deadlines themselves (scripts/test-app.sh, tests/app/harness.py) with a planted hang:
# the app is started through a wrapper that waits an hour before its window (JEMMA_E2E_PLANT_HANG=window).
#   1. Step deadline: WebDriver session creation hangs; the harness logs a retry with a fresh driver and app,
#      then fails naming the step, well within its deadlines.
#   2. Outer bound: with the step deadline out of reach, test-app.sh's own bound kills the run and names the
#      step that was running.
# Each case also checks that nothing the run started is left behind. Prints "N passed, N failed".
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
bounded 1800 cargo build --locked -p jemma-app
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; sed 's/^/     | /' "$OUT" | tail -40; }

# run_case NAME MAX_SECONDS ENV...: runs test-app.sh with ENV and the planted hang; it must fail within
# MAX_SECONDS. Leaves its output in $OUT.
run_case() {
  local name=$1 max=$2; shift 2
  local t0 rc=0
  t0=$(date +%s)
  env JEMMA_E2E_PLANT_HANG=window "$@" bash scripts/test-app.sh >"$OUT" 2>&1 || rc=$?
  local dt=$(($(date +%s) - t0))
  if [ "$rc" -ne 0 ] && [ "$dt" -le "$max" ]; then
    ok "$name: failed as it must, in ${dt} s (bound ${max} s)"
  else
    bad "$name: exit $rc after ${dt} s (expected a failure within ${max} s)"
  fi
  # The wrapper's `sleep 3600` is the planted app: none may survive the run. Zombies are dead already (a
  # container's PID 1 may not reap the orphans it inherits), so only live processes count.
  local left
  left=$(ps -eo stat=,pid=,args= | awk '$1 !~ /^Z/ && /sleep 3600|WebKitWebDriver|tauri-driver|jemma-app/ && !/awk/')
  if [ -n "$left" ]; then
    bad "$name: processes left behind: $(echo "$left" | tr '\n' ';')"
  else
    ok "$name: nothing left running"
  fi
}

expect() {
  if grep -qF -- "$2" "$OUT"; then ok "$1"; else bad "$1 (no line with: $2)"; fi
}

run_case "step deadline" 120 JEMMA_E2E_SESSION_TIMEOUT=6
expect "step deadline: the first session attempt is retried, and the retry is logged" \
  "RETRY: FAIL step 'WebDriver session creation (attempt 1 of 2)' hung"
expect "step deadline: the failure names the step" \
  "FAIL step 'WebDriver session creation (attempt 2 of 2)' hung"

run_case "outer bound" 90 JEMMA_E2E_SESSION_TIMEOUT=3600 JEMMA_APP_E2E_TIMEOUT=25
expect "outer bound: the failure names the bound and the step that was running" \
  "exceeded its bound of 25 s during step: WebDriver session creation (attempt 1 of 2)"

echo "app e2e harness: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
