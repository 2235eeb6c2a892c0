#!/usr/bin/env bash
# Write-path benchmark: `nix copy --to unix://…` of a whole bench corpus (a real Nix store built
# by build-corpora.sh) into `casnix serve` against the same copy into a real nix-daemon (Debian's
# Nix 2.8) with an empty local store, and into Nix 2.34's nix-daemon (Debian sid, inside
# tests/nixenv's sid root, when present). Same client (Nix 2.8), same source, fresh destination
# each run, alternating order; wall time and bytes on disk afterwards (du of the data dir vs of the
# destination store root). Prints a markdown table and merges it into bench/RESULTS.md ("Write").
#
#   bench/write.sh                         # CORPUS=releases, RUNS=3
#   CORPUS=generations RUNS=1 bench/write.sh
#   CASNIX=/path/to/casnix bench/write.sh  # measure a prebuilt binary
#   FRESH_FS=0 bench/write.sh              # destinations on BENCH_DIR's own filesystem (as before)
#
# With REPACK=1 (the default) two more casnix runs start from a data dir already holding a backlog
# of fast-written data (the generations corpus imported at level 1): "casnix, backlog idle" copies
# beside nothing, "casnix, repack --idle running" copies while `casnix repack --idle` rewrites the
# backlog in another process on the same data dir (as cron would run it). Their ratio is the cost of
# repacking to a client (target ≤ 1.1).
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
CORPUS=${CORPUS:-releases}
REPACK=${REPACK:-1}
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
NIX234=0
[[ -x $SID_ROOT/usr/bin/nix-daemon ]] && NIX234=1
BACKLOG=${BACKLOG:-generations}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
CASNIX=${CASNIX:-}
RESULTS=${RESULTS:-$HERE/RESULTS.md}
SRC=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/write
nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')

BENCH=write

[[ -f $SRC/nix/var/nix/db/db.sqlite ]] || die "no corpus at $SRC: run bench/build-corpora.sh first"
command -v nix-daemon >/dev/null || apt-get install -y -q nix-bin >&2
mkdir -p "$W" "$BENCH_DIR/bin"
# The backlog goes to a journaled ext4 made afresh for this run, and each copy's destination to
# one made afresh for that copy (lib.sh's fresh_fs, which says why): a store written where the
# previous copy's had just been deleted cost its writer more CPU even on a journaled ext4.
# FRESH_FS=0 writes them to directories of BENCH_DIR's filesystem.
FRESH_FS=${FRESH_FS:-1}
if [[ $FRESH_FS == 1 ]]; then fresh_fs "$W" "$BENCH_DIR/write.img"; else unmount_fs "$W"; fi
if [[ -z $CASNIX ]]; then
  CASNIX=$BENCH_DIR/bin/casnix
  log "building casnix from $REPO"
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build failed"
fi
npaths=$(nix "${nixo[@]}" path-info --store "local?root=$SRC" --all | wc -l)
narbytes=$(nix "${nixo[@]}" path-info --store "local?root=$SRC" --all --json | python3 -c 'import json,sys; print(sum(p["narSize"] for p in json.load(sys.stdin)))')
log "corpus $CORPUS: $npaths paths, $narbytes NAR bytes"

wait_sock() { # SOCKET PID
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$2" 2>/dev/null || die "daemon exited"
    if [[ -S $1 ]] && nix "${nixo[@]}" store ping --store "unix://$1" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  die "no answer on $1"
}

# run_one DAEMON RUN: one copy into a fresh destination; appends "DAEMON seconds bytes" to raw.
# DAEMON: nix-daemon, casnix (empty data dir), casnix-backlog (a copy of the backlog data dir),
# casnix-repacking (the same, with casnix repack --idle running on it during the copy).
run_one() {
  local who=$1 sock=$W/$1.sock dest=$W/dest/$1 pid t0 t1 rpid=
  rm -rf "$sock"
  fresh_dir "$W/dest" "$BENCH_DIR/write-dest.img"
  mkdir -p "$dest"
  if [[ $who == casnix-backlog || $who == casnix-repacking ]]; then
    rm -rf "$dest"
    cp -a "$W/backlog" "$dest"
  fi
  if [[ $who == casnix* ]]; then
    "$CASNIX" --data-dir "$dest" serve --socket "$sock" >"$W/$who.log" 2>&1 &
  elif [[ $who == nix-daemon-2.34* ]]; then
    # Inside the sid root: its /nix is the destination, its /tmp holds the socket. -fsync: with
    # fsync-store-paths, each path's files synced before it is registered, as casnix syncs each
    # path before it acknowledges it (Nix's default leaves them to writeback until the final sync).
    local fsync=
    [[ $who != *-fsync ]] || fsync="--option fsync-store-paths true"
    mkdir -p "$dest/nix" "$W/sid-sock"
    sock=$W/sid-sock/nix234.sock
    rm -f "$sock"
    in_sid "$dest/nix" "$W/sid-sock" "exec env NIX_DAEMON_SOCKET_PATH=/tmp/nix234.sock nix-daemon $fsync --option build-users-group '' \
      --option substituters '' --option experimental-features nix-command" >"$W/$who.log" 2>&1 &
  else
    NIX_DAEMON_SOCKET_PATH=$sock nix-daemon --store "local?root=$dest" "${nixo[@]}" >"$W/$who.log" 2>&1 &
  fi
  pid=$!
  wait_sock "$sock" "$pid"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  if [[ $who == casnix-repacking ]]; then
    "$CASNIX" --data-dir "$dest" repack --idle >"$W/repack.log" 2>&1 &
    rpid=$!
    sleep 1 # let it get going
    kill -0 "$rpid" 2>/dev/null || die "repack ended before the copy began: $(cat "$W/repack.log")"
  fi
  t0=$(date +%s.%N)
  nix "${nixo[@]}" copy --no-check-sigs --all --from "local?root=$SRC" --to "unix://$sock" 2>>"$W/$who.client.log"
  sync # what nix-daemon wrote is not durable until here (casnix fsyncs before acknowledging)
  t1=$(date +%s.%N)
  if [[ -n $rpid ]]; then
    # The repack must still be running, or the copy was not measured beside it.
    kill -0 "$rpid" 2>/dev/null || die "repack ended during the copy: a bigger BACKLOG is needed"
    kill "$rpid"
    wait "$rpid" 2>/dev/null || true
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$who $(echo "$t1 - $t0" | bc) $(du -sb "$dest" | cut -f1) $(uptime | sed 's/.*average: //; s/,.*//')" >>"$W/raw"
}

: >"$W/raw"
if ((REPACK)); then
  # The backlog: a data dir of fast-written (unpacked) data for the repack to work on.
  rm -rf "$W/backlog"
  log "backlog: importing $BACKLOG at level 1"
  "$CASNIX" --data-dir "$W/backlog" import --from-nix-store "$BENCH_DIR/corpora/$BACKLOG" >"$W/backlog.log" 2>&1 || die "backlog import failed"
fi
for ((r = 0; r < RUNS; r++)); do
  if ((r % 2)); then order="nix-daemon casnix"; else order="casnix nix-daemon"; fi
  if ((NIX234)); then
    if ((r % 2)); then order="nix-daemon-2.34-fsync nix-daemon-2.34 $order"; else order="$order nix-daemon-2.34 nix-daemon-2.34-fsync"; fi
  fi
  if ((REPACK)); then
    if ((r % 2)); then order="$order casnix-repacking casnix-backlog"; else order="$order casnix-backlog casnix-repacking"; fi
  fi
  for who in $order; do
    log "run $r: $who"
    run_one "$who" "$r"
  done
done

med() { awk -v w="$1" -v c="$2" '$1 == w { print $c }' "$W/raw" | median; }
tc=$(med casnix 2)
tn=$(med nix-daemon 2)
bc_=$(med casnix 3)
bn=$(med nix-daemon 3)
ratio=$(echo "scale=2; $tc / $tn" | bc)
met=no
(($(echo "$ratio <= 1.0" | bc))) && met=yes
{
  echo "<!-- bench/write.sh: begin (this section is rewritten by every write.sh run) -->"
  echo "## Write: nix copy --to casnix serve vs nix-daemon"
  echo
  echo "- $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB;" \
    "commit $(cd "$REPO" && git rev-parse --short HEAD); $(nix --version | head -1); median of $RUNS runs, alternating order, caches dropped$([[ $FRESH_FS == 1 ]] && echo "; each destination on a journaled ext4 made afresh for it (loop device), not on this machine's journal-less root ext4")"
  echo "- corpus $CORPUS: $npaths paths, $((narbytes / 1048576)) MiB NAR; client: nix copy --no-check-sigs --all --from local?root=CORPUS (Nix 2.8)"
  echo "- load averages during runs: $(awk '{print $4}' "$W/raw" | xargs)"
  echo
  echo "| figure | nix-daemon (local store) | casnix serve | casnix / nix-daemon | target | met |"
  echo "|---|---|---|---|---|---|"
  echo "| nix copy --to wall time (incl. final sync) | ${tn} s | ${tc} s | $ratio | ≤ 1.0 | $met |"
  if ((NIX234)); then
    t4=$(med nix-daemon-2.34 2)
    r4=$(echo "scale=2; $tc / $t4" | bc)
    m4=no
    (($(echo "$r4 <= 1.0" | bc))) && m4=yes
    echo "| nix copy --to wall time (incl. final sync), anchor Nix 2.34's nix-daemon (sid root) | ${t4} s | ${tc} s | $r4 | ≤ 1.0 | $m4 |"
    t5=$(med nix-daemon-2.34-fsync 2)
    echo "| nix copy --to wall time (incl. final sync), Nix 2.34's nix-daemon with fsync-store-paths = true (each path synced before it is registered, as casnix does) | ${t5} s | ${tc} s | $(echo "scale=2; $tc / $t5" | bc) | — | |"
  fi
  echo "| bytes on disk afterwards | $((bn / 1048576)) MiB | $((bc_ / 1048576)) MiB | $(echo "scale=3; $bc_ / $bn" | bc) | | |"
  if ((REPACK)); then
    tb=$(med casnix-backlog 2)
    tr=$(med casnix-repacking 2)
    rr=$(echo "scale=2; $tr / $tb" | bc)
    rmet=no
    (($(echo "$rr <= 1.1" | bc))) && rmet=yes
    echo
    echo "Beside a repack: both runs start from a data dir holding the $BACKLOG corpus as imported (level 1, not repacked)."
    echo
    echo "| figure | casnix, backlog idle | casnix, repack --idle running | repacking / idle | target | met |"
    echo "|---|---|---|---|---|---|"
    echo "| nix copy --to wall time (incl. final sync) | ${tb} s | ${tr} s | $rr | ≤ 1.1 | $rmet |"
  fi
  echo "<!-- bench/write.sh: end -->"
} >"$W/section.md"
cat "$W/section.md"
merge_section write.sh "$W/section.md" "$RESULTS"
log "merged into $RESULTS"
