#!/usr/bin/env bash
# Set up (or tear down) the whole Local Overlay Store stack on this machine,
# with casnix as the lower store:
#
#   casnix serve --mount LOWER        daemon socket + read-only FUSE view of casnix's paths
#   overlayfs LOWER + UPPER -> MERGED  what Nix sees as its store directory
#   local-overlay://…                  Nix's store URL, printed at the end
#
# Usage: tests/overlay-stack.sh up|down [STATE_DIR]   (as root; Nix >= 2.22 with
#        the local-overlay-store experimental feature; STATE_DIR defaults to /var/lib/casnix-overlay)
# Environment: CASNIX (binary, default: casnix on PATH), CASNIX_DIR (data dir), UPPER_DB
#   (the overlay store's Nix database, default /nix/var/nix/db/db.sqlite: `casnix gc` must be
#   given it, or it deletes lower paths the upper layer uses).
#
# The Go test TestLocalOverlayStore (tests/overlay_e2e_test.go) runs the same
# stack inside Debian trixie and sid roots with Nix 2.26 and 2.34.
set -euo pipefail

cmd=${1:-}
S=${2:-/var/lib/casnix-overlay}
CASNIX=${CASNIX:-casnix}
LOWER=$S/lower      # FUSE mount: casnix's paths
UPPER=$S/upper      # new paths built by Nix
WORK=$S/work        # overlayfs work dir
MERGED=${MERGED:-/nix/store}
SOCK=$S/daemon.sock
UPPER_DB=${UPPER_DB:-/nix/var/nix/db/db.sqlite}

case $cmd in
up)
  mkdir -p "$LOWER" "$UPPER" "$WORK" "$MERGED"
  "$CASNIX" ${CASNIX_DIR:+--data-dir "$CASNIX_DIR"} serve --socket "$SOCK" --mount "$LOWER" \
    >"$S/serve.log" 2>&1 &
  echo $! >"$S/serve.pid"
  for _ in $(seq 100); do [[ -S $SOCK ]] && mountpoint -q "$LOWER" && break; sleep 0.1; done
  mountpoint -q "$LOWER" || { echo "casnix did not come up; see $S/serve.log" >&2; exit 1; }
  # lowerdir must be written exactly as the lower store's real= (no trailing
  # slash): Nix checks /proc/self/mounts for it.
  mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK" "$MERGED"
  lower_url="unix://$SOCK?real=$LOWER"
  enc=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$lower_url")
  cat <<EOT
Overlay stack is up. Put this in nix.conf (of the nix-daemon or client that owns $MERGED):

  experimental-features = nix-command local-overlay-store
  store = local-overlay://?lower-store=$enc&upper-layer=$UPPER

New paths imported into casnix appear in $LOWER at once; run 'mount -o remount $MERGED'
for overlayfs to show them. Tear down with: $0 down $S

Collect garbage in casnix only with the overlay's database as roots (the overlay registers
nothing in casnix; without it, gc deletes lower paths the upper layer uses):

  $CASNIX ${CASNIX_DIR:+--data-dir $CASNIX_DIR }gc --upper-db $UPPER_DB
EOT
  ;;
down)
  umount "$MERGED" 2>/dev/null || umount -l "$MERGED" 2>/dev/null || true
  if [[ -f $S/serve.pid ]]; then
    kill -TERM "$(cat "$S/serve.pid")" 2>/dev/null || true
    rm -f "$S/serve.pid"
  fi
  ;;
*)
  echo "usage: $0 up|down [STATE_DIR]" >&2
  exit 2
  ;;
esac
