#!/usr/bin/env bash
# Renders the app's real tray menu to docs/screenshots/tray-menu.png: the app runs under Xvfb with `trayer`
# as an XEmbed tray host (libayatana-appindicator falls back to it when no StatusNotifier host exists), one
# chat request makes the tok/s figures live, and xdotool opens the menu.
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
apt_ensure trayer xdotool imagemagick
bounded 1800 cargo build --locked -p jemma-app
bash scripts/fixtures.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/home"
{
  printf '[server]\nport = 18731\n'
  app_tiers "$JEMMA_ROOT/fixtures/tiny"
} >"$WORK/jemma.toml"
cat >"$WORK/run.sh" <<'SH'
trayer --edge top --align right --widthtype pixel --width 120 --height 32 --SetDockType true --transparent false --tint 0xdddddd &
sleep 2
"$APP" --hidden &
sleep 8
curl -s -H 'content-type: application/json' -d '{"model":"fast","messages":[{"role":"user","content":"Hello!"}],"max_tokens":24}' \
  http://127.0.0.1:18731/v1/chat/completions >/dev/null
sleep 2
xdotool mousemove 1007 16 click 1
sleep 2
import -window root -crop 1024x400+0+0 "$OUTPNG"
SH
HOME=$WORK/home JEMMA_CONFIG=$WORK/jemma.toml JEMMA_LOG=warn APP=$JEMMA_ROOT/target/debug/jemma-app \
  OUTPNG=$JEMMA_ROOT/docs/screenshots/tray-menu.png \
  timeout 60 xvfb-run -a -s "-screen 0 1024x700x24" dbus-run-session -- bash "$WORK/run.sh" >/dev/null 2>&1 || true
ls -la docs/screenshots/tray-menu.png
