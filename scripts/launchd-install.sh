#!/usr/bin/env bash
# Installs the headless gateway (`jemma serve`) as the LaunchAgent ai.jemma.gateway for the current user:
# renders launchd/ai.jemma.gateway.plist into ~/Library/LaunchAgents and (re)starts it. macOS only.
#
#   scripts/launchd-install.sh --config FILE [--bin PATH] [--log-dir DIR]
#   scripts/launchd-install.sh --print --config FILE [...]   render to stdout only (any OS; no launchctl)
#
# --bin defaults to `jemma` on PATH, else target/release/jemma; --log-dir to ~/Library/Logs/Jemma.
# Paths are made absolute, since launchd resolves nothing relative. Re-running replaces the agent.
#
# Not for Macs that run the menu-bar app: the app starts at login through tauri-plugin-autostart and runs
# its own gateway, so both would compete for the same port. Undo with scripts/launchd-uninstall.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

LABEL=ai.jemma.gateway
TEMPLATE=$JEMMA_ROOT/launchd/$LABEL.plist

BIN=""
CONFIG=""
LOG_DIR="$HOME/Library/Logs/Jemma"
PRINT=0
while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --config) CONFIG=${2:?--config needs a path}; shift 2 ;;
    --log-dir) LOG_DIR=${2:?--log-dir needs a path}; shift 2 ;;
    --print) PRINT=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if [ "$PRINT" -eq 0 ] && ! is_macos; then
  die "launchd agents exist only on macOS (this is $(uname -s)); elsewhere run \`jemma serve\` under your init system (e.g. a systemd user unit) or use scripts/run"
fi

# abs_path PATH: PATH made absolute (logical, symlinks kept); its directory must exist.
abs_path() {
  local dir
  dir=$(cd "$(dirname "$1")" && pwd) || die "no such directory: $(dirname "$1")"
  case $dir in
    /) printf '/%s' "$(basename "$1")" ;;
    *) printf '%s/%s' "$dir" "$(basename "$1")" ;;
  esac
}

[ -n "$CONFIG" ] || die "--config FILE is required (see docs/jemma.example.toml)"
[ -f "$CONFIG" ] || die "config file not found: $CONFIG"
CONFIG=$(abs_path "$CONFIG")
CONFIG_DIR=$(dirname "$CONFIG")

if [ -z "$BIN" ]; then
  BIN=$(command -v jemma || true)
  [ -n "$BIN" ] || BIN=${CARGO_TARGET_DIR:-$JEMMA_ROOT/target}/release/jemma
fi
[ -x "$BIN" ] || die "jemma binary not found or not executable: $BIN (build it with: cargo build --release --bin jemma)"
BIN=$(abs_path "$BIN")

if [ "$PRINT" -eq 0 ]; then
  mkdir -p "$LOG_DIR"
fi
case $LOG_DIR in
  /*) ;;
  *) LOG_DIR=$(pwd)/$LOG_DIR ;;
esac
LOG_DIR=${LOG_DIR%/}

for p in "$BIN" "$CONFIG" "$LOG_DIR"; do
  case $p in *$'\n'*) die "paths with newlines cannot go into a launchd plist: $p" ;; esac
done

# Same escaping as jemma_platform::launchd::render_plist: XML first, then for the sed replacement text.
xml_escape() {
  printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g' -e "s/'/\&apos;/g"
}
sed_text() { xml_escape "$1" | sed -e 's/[\\&|]/\\&/g'; }

render() {
  sed -e "s|__JEMMA_CONFIG_DIR__|$(sed_text "$CONFIG_DIR")|g" \
      -e "s|__JEMMA_CONFIG__|$(sed_text "$CONFIG")|g" \
      -e "s|__JEMMA_BIN__|$(sed_text "$BIN")|g" \
      -e "s|__LOG_DIR__|$(sed_text "$LOG_DIR")|g" \
      "$TEMPLATE"
}

if [ "$PRINT" -eq 1 ]; then
  render
  exit 0
fi

AGENTS=$HOME/Library/LaunchAgents
PLIST=$AGENTS/$LABEL.plist
DOMAIN=gui/$(id -u)
mkdir -p "$AGENTS"
tmp=$(mktemp "$AGENTS/.$LABEL.XXXXXX")
trap 'rm -f "$tmp"' EXIT
render >"$tmp"
plutil -lint "$tmp" >/dev/null || die "rendered plist is invalid (plutil -lint $tmp)"
chmod 644 "$tmp"
mv -f "$tmp" "$PLIST"
trap - EXIT

launchctl bootout "$DOMAIN/$LABEL" 2>/dev/null || true
# bootout returns before the old job is fully gone, and bootstrap then fails with "5: Input/output error";
# a few short retries cover that window.
ok=0
for _ in 1 2 3 4 5; do
  if launchctl bootstrap "$DOMAIN" "$PLIST" 2>/dev/null; then ok=1; break; fi
  sleep 1
done
[ "$ok" -eq 1 ] || launchctl bootstrap "$DOMAIN" "$PLIST" || die "launchctl bootstrap $DOMAIN $PLIST failed"
launchctl kickstart -k "$DOMAIN/$LABEL"

log "installed $PLIST"
log "serving $CONFIG with $BIN; logs in $LOG_DIR/gateway.log and gateway.err.log"
log "status: launchctl print $DOMAIN/$LABEL    remove: scripts/launchd-uninstall.sh"
