#!/usr/bin/env bash
# Stops and removes the ai.jemma.gateway LaunchAgent installed by scripts/launchd-install.sh. macOS only.
# Logs in ~/Library/Logs/Jemma are kept. Safe to run when nothing is installed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

LABEL=ai.jemma.gateway
is_macos || die "launchd agents exist only on macOS (this is $(uname -s)); nothing to uninstall here"

PLIST=$HOME/Library/LaunchAgents/$LABEL.plist
DOMAIN=gui/$(id -u)

# bootout stops the gateway (SIGTERM, so it shuts down cleanly) and unloads the job; it fails when the job
# is not loaded, which is fine here.
if launchctl bootout "$DOMAIN/$LABEL" 2>/dev/null; then
  log "stopped $DOMAIN/$LABEL"
fi
if [ -e "$PLIST" ]; then
  rm -f "$PLIST"
  log "removed $PLIST"
else
  log "no $PLIST; nothing to remove"
fi
