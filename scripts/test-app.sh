#!/usr/bin/env bash
# The menu-bar app's end-to-end test on Linux: builds jemma-app, then runs tests/app/e2e_app.py in a fresh
# Xvfb display and D-Bus session with an unlocked gnome-keyring and an isolated HOME. Needs the apt packages
# and tauri-driver that scripts/setup installs (--app).
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
bounded 1800 cargo build --locked -p jemma-app
# The web chat page's test (tests/app/e2e_web.py) runs `jemma serve` itself.
bounded 1800 cargo build --locked -p jemma --bin jemma
bounded 1800 bash scripts/fixtures.sh
BOUND=${JEMMA_APP_E2E_TIMEOUT:-600}
WORK=$(mktemp -d)
# Whatever the run started (Xvfb, dbus-daemon, gnome-keyring-daemon, tauri-driver, WebKitWebDriver, the app and
# its WebKit processes) inherits HOME=$WORK/home; some of them leave the process group (the keyring daemon
# detaches), so they are found by that HOME, which no other process has.
kill_run() {
  local p
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    if grep -qzxF "HOME=$WORK/home" "$p/environ" 2>/dev/null; then
      kill -9 "${p#/proc/}" 2>/dev/null || true
    fi
  done
}
trap 'kill_run; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/home"
# The primary tier names a catalog model that is not downloaded yet: the test downloads it with one click on
# the tray's "Download models" from a stand-in Hub (tests/app/fake_hub.py) into $WORK/hf.
cat >"$WORK/models.toml" <<TOML
[models.test-tiny]
tier = "primary"
format = "mlx"
repo = "jemma-test/gemma-4-tiny"
download_bytes = 6000000
memory_bytes = 10000000
min_free_bytes = 20000000
TOML
{
  printf '[models]\nauto_download = false\ncache_dir = "%s"\n' "$WORK/hf"
  app_tiers test-tiny
} >"$WORK/jemma.toml"
# A stand-in `tailscale` CLI (the real one cannot be installed here): answers `status --json` with a recorded
# status and records the arguments of every call, so the test can check what "Expose on tailnet" ran.
cat >"$WORK/tailscale" <<SH
#!/bin/sh
echo "\$*" >>"$WORK/tailscale.calls"
case "\$1" in
  status) cat "$WORK/status.json" ;;
  serve) exit 0 ;;
  *) echo "unexpected: \$*" >&2; exit 2 ;;
esac
SH
chmod +x "$WORK/tailscale"
# The test adds a peer (another Jemma node on 127.0.0.2) to this status.
cp "$JEMMA_ROOT/crates/platform/tests/data/status-running.json" "$WORK/status.json"
# Screenshots go to a temp dir; JEMMA_SHOTS=docs/screenshots refreshes the ones the README shows.
export APP=${CARGO_TARGET_DIR:-$JEMMA_ROOT/target}/debug/jemma-app SHOTS=${JEMMA_SHOTS:-$WORK/shots}
if [ "${JEMMA_E2E_PLANT_HANG:-}" = window ]; then
  printf '#!/bin/sh\nsleep 3600\nexec "%s" "$@"\n' "$APP" >"$WORK/delayed-app"
  chmod +x "$WORK/delayed-app"
  APP=$WORK/delayed-app
  log "planted hang: the app starts through $APP, which waits an hour"
elif [ "${JEMMA_E2E_PLANT_HANG:-}" = collision ]; then
  # The cause of issue 12's hang, made certain: the gateway listens on the port WebKitWebDriver gave the
  # inspector (as an unlucky ephemeral bind would), so WebKit cannot start the inspector server.
  printf '#!/bin/sh\nJEMMA_PORT=${WEBKIT_INSPECTOR_SERVER##*:} exec "%s" "$@"\n' "$APP" >"$WORK/colliding-app"
  chmod +x "$WORK/colliding-app"
  APP=$WORK/colliding-app
  log "planted collision: the gateway takes the WebKit inspector's port"
fi
export JEMMA_E2E_STEP_FILE=$WORK/step
echo "starting Xvfb, D-Bus and the keyring" >"$JEMMA_E2E_STEP_FILE"
export JEMMA_CONFIG=$WORK/jemma.toml JEMMA_PORT=0 JEMMA_LOG=warn JEMMA_TAILSCALE_CLI=$WORK/tailscale
export TAILSCALE_CALLS=$WORK/tailscale.calls JEMMA_CATALOG=$WORK/models.toml TAILSCALE_STATUS=$WORK/status.json
export JEMMA_BIN=${CARGO_TARGET_DIR:-$JEMMA_ROOT/target}/debug/jemma
PY=$(venv_python)
# HOME is isolated so the autostart entry and the keyring live in the temp dir.
rc=0
HOME=$WORK/home timeout -k 10 "$BOUND" xvfb-run -a -s "-screen 0 1280x900x24" dbus-run-session -- bash -c '
  export XDG_DATA_HOME=$HOME/.local/share
  printf jemma | timeout 30 gnome-keyring-daemon --unlock --components=secrets >/dev/null
  "$0" tests/app/e2e_app.py && exec "$0" tests/app/e2e_web.py' "$PY" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  die "app e2e: the run exceeded its bound of ${BOUND} s during step: $(cat "$JEMMA_E2E_STEP_FILE"); everything it started was killed"
fi
exit "$rc"
