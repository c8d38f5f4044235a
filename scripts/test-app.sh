#!/usr/bin/env bash
# The menu-bar app's end-to-end test on Linux: builds jemma-app, then runs tests/app/e2e_app.py in a fresh
# Xvfb display and D-Bus session with an unlocked gnome-keyring and an isolated HOME. Needs the apt packages
# and tauri-driver that scripts/setup installs (--app).
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
cargo build --locked -p jemma-app
bash scripts/fixtures.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
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
cat >"$WORK/jemma.toml" <<TOML
[models]
auto_download = false
cache_dir = "$WORK/hf"
[tiers.fast]
model = "$JEMMA_ROOT/fixtures/tiny"
[tiers.primary]
model = "test-tiny"
[tiers.heavy]
kind = "openai"
url = "http://127.0.0.1:9"
model = "gemma-4-26b-a4b"
enabled = false
TOML
# A stand-in `tailscale` CLI (the real one cannot be installed here): answers `status --json` with a recorded
# status and records the arguments of every call, so the test can check what "Expose on tailnet" ran.
cat >"$WORK/tailscale" <<SH
#!/bin/sh
echo "\$*" >>"$WORK/tailscale.calls"
case "\$1" in
  status) cat "$JEMMA_ROOT/crates/platform/tests/data/status-running.json" ;;
  serve) exit 0 ;;
  *) echo "unexpected: \$*" >&2; exit 2 ;;
esac
SH
chmod +x "$WORK/tailscale"
# Screenshots go to a temp dir; JEMMA_SHOTS=docs/screenshots refreshes the ones the README shows.
export APP=$JEMMA_ROOT/target/debug/jemma-app SHOTS=${JEMMA_SHOTS:-$WORK/shots}
export JEMMA_CONFIG=$WORK/jemma.toml JEMMA_PORT=0 JEMMA_LOG=warn JEMMA_TAILSCALE_CLI=$WORK/tailscale
export TAILSCALE_CALLS=$WORK/tailscale.calls JEMMA_CATALOG=$WORK/models.toml
PY=$(venv_python)
# HOME is isolated so the autostart entry and the keyring live in the temp dir.
HOME=$WORK/home xvfb-run -a -s "-screen 0 1280x900x24" dbus-run-session -- bash -c '
  export XDG_DATA_HOME=$HOME/.local/share
  printf jemma | gnome-keyring-daemon --unlock --components=secrets >/dev/null
  exec "$0" tests/app/e2e_app.py' "$PY"
